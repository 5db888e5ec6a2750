"""Load a merged folder into `NeoXForCausalLM`, one safetensors file at a time, straight to the device."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from neoxconv.config import NeoXConfig
from neoxconv.dtypes import canonical_dtype
from neoxconv.errors import NeoXConvError, UsageError, VerificationError
from neoxconv.check.integrity import INDEX, load_config
from neoxconv.layers import NeoXForCausalLM, RotaryTables, build_model
from neoxconv.runtime.placement import Device, PlacementPlan, load_placed, plan_placement
from neoxconv.progress import progress_bar

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: fp16 on CUDA, fp32 on CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return TORCH_DTYPES[canonical_dtype(dtype)]
    except ValueError:
        raise NeoXConvError(f"unknown dtype {dtype!r}; use auto, fp16, bf16 or fp32") from None


@dataclass
class LoadedModel:
    model: NeoXForCausalLM
    config: NeoXConfig
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    file_bytes: int
    placement: PlacementPlan | None = None  # None: every weight resident on ``device``

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.model)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers that are weights (tied tensors counted once; offloaded ones,
    on the meta device between uses, not at all)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "rotary" not in n]:
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def load_model(out: Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               quiet: bool = True, max_memory: dict[Device, int] | int | None = None, device_map: str | None = None,
               fit: bool = False, reserve: int = 0) -> LoadedModel:
    """Build the model on the meta device, then fill it file by file (peak host memory ~ one file).

    ``device`` and ``dtype`` take the CLI spellings ('auto', 'cuda', 'fp16', ...) or torch objects.
    ``max_memory`` / ``device_map`` place the model over GPUs, CPU and disk (see ``neoxconv.runtime.placement``);
    ``fit`` does so by itself when the weights plus ``reserve`` bytes do not fit the device.
    """
    out = Path(out)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    tdtype = resolve_dtype(dtype, dev) if isinstance(dtype, str) else dtype
    config = load_config(out)
    index = json.loads((out / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = build_model(config)  # NeoXForCausalLM or LlamaForCausalLM
    if max_memory is not None or device_map is not None or fit:
        model = model.to(dtype=tdtype)  # meta: offloaded weights take the dtype of their meta placeholders
        plan = plan_placement(model, dtype=tdtype, main_device=dev, device_map=device_map, max_memory=max_memory,
                              reserve=reserve)
        if plan is not None:
            read = load_placed(out, model, plan, dtype=tdtype, weight_map=index["weight_map"], quiet=quiet)
            model.eval().requires_grad_(False)
            return LoadedModel(model=model, config=config, device=dev, dtype=tdtype,
                               load_seconds=time.perf_counter() - t0, file_bytes=read, placement=plan)
    from safetensors import safe_open

    total = 0
    safetensors_device = str(dev) if dev.type == "cuda" else "cpu"
    with progress_bar(total=len(files), desc="load", quiet=quiet) as bar:
        for file in files:
            path = out / file
            total += path.stat().st_size
            with safe_open(str(path), framework="pt", device=safetensors_device) as f:
                tensors = {name: f.get_tensor(name).to(device=dev, dtype=tdtype) for name in f.keys()}
            result = model.load_state_dict(tensors, strict=False, assign=True)
            if result.unexpected_keys:
                raise VerificationError(f"{path}: unexpected tensors {result.unexpected_keys}")
            del tensors
            bar.update(1)
    model.tie_weights()
    model.rotary = RotaryTables(config.rotary_dims, config.rotary_emb_base, config.max_position_embeddings).to(dev)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise VerificationError(f"{out}: no weights for {', '.join(still_meta[:8])}"
                                + (f" and {len(still_meta) - 8} more" if len(still_meta) > 8 else ""))
    model.eval().requires_grad_(False)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return LoadedModel(model=model, config=config, device=dev, dtype=tdtype,
                       load_seconds=time.perf_counter() - t0, file_bytes=total)
