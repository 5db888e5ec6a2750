"""The one loader of a merged folder: build the model on the meta device, fill it one safetensors file at a time
straight to its device, and (with a placement) dispatch the stages kept on disk or in CPU RAM.

A resident model and a placed one (``--max-memory`` / ``--device-map``, see ``neoxconv.runtime.placement``)
go through the same steps; they differ only in where each tensor goes. The caller gets a `LoadedModel` that
says where the model runs (``devices``, for `generate`), never state hung on the model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from neoxconv.config import NeoXConfig, load_out_config
from neoxconv.dtypes import as_torch_dtype, canonical_dtype
from neoxconv.errors import NeoXConvError, UsageError, VerificationError
from neoxconv.layers import NeoXForCausalLM, RotaryTables, build_model, weight_bytes
from neoxconv.model.generation import ExecutionDevices
from neoxconv.output.folder import INDEX
from neoxconv.progress import progress_bar
from neoxconv.runtime.placement import Device, PlacementPlan, dispatch_placed, plan_placement, require_accelerate
from neoxconv.source.hf_folder import read_weight_map

log = logging.getLogger(__name__)


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
        return as_torch_dtype(canonical_dtype(dtype))
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
    devices: ExecutionDevices  # where the inputs and each layer run: pass to generate()
    placement: PlacementPlan | None = None  # None: every weight resident on ``device``

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.model)


def _check_names(out: Path, model: torch.nn.Module, weight_map: dict[str, str]) -> None:
    """Every weight of the model in the index, and nothing else: checked before a byte is read."""
    missing = [n for n, _ in model.named_parameters() if n not in weight_map]  # a tied readout is not listed
    known = set(model.state_dict(keep_vars=True))
    unexpected = [n for n in weight_map if n not in known]
    for where, what, names in ((out, "no weights for", missing), (out / INDEX, "unexpected tensors", unexpected)):
        if names:
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            raise VerificationError(f"{where}: {what} {', '.join(names[:8])}{more}")


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
    config = load_out_config(out)
    weight_map = read_weight_map(Path(out) / INDEX, VerificationError)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = build_model(config).to(dtype=tdtype)  # NeoXForCausalLM or LlamaForCausalLM; offloaded weights
    _check_names(out, model, weight_map)            # keep the dtype of their meta placeholders
    plan = None
    if max_memory is not None or device_map is not None or fit:
        plan = plan_placement(model, dtype=tdtype, main_device=dev, device_map=device_map, max_memory=max_memory,
                              reserve=reserve)
    if plan is not None:
        require_accelerate()
    # where each tensor is loaded now; None: left in its file, read for each use
    targets = {name: dev for name in weight_map} if plan is None else \
        {name: plan.load_device(name) for name in weight_map}
    read, host_state = _fill(out, model, weight_map, targets, dtype=tdtype, main_device=dev, quiet=quiet)
    model.tie_weights()
    model.rotary = RotaryTables(config.rotary_dims, config.rotary_emb_base, config.max_position_embeddings).to(dev)
    if plan is None:
        devices = ExecutionDevices(dev, (dev,) * len(model.blocks))
    else:
        dispatch_placed(out, model, plan, weight_map=weight_map, host_state=host_state, dtype=tdtype)
        devices = plan.devices
    model.eval().requires_grad_(False)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return LoadedModel(model=model, config=config, device=dev, dtype=tdtype, load_seconds=time.perf_counter() - t0,
                       file_bytes=read, devices=devices, placement=plan)


def _fill(out: Path, model: torch.nn.Module, weight_map: dict[str, str], targets: dict[str, torch.device | None],
          *, dtype: torch.dtype, main_device: torch.device, quiet: bool) -> tuple[int, dict[str, torch.Tensor]]:
    """Load each tensor that has a target device from its file, cast to ``dtype``; returns (bytes of the files
    read, the tensors held in CPU RAM for a GPU run: accelerate moves them to the GPU for each use).

    Every file's header is checked to hold what the index places there, offloaded tensors included (read
    later, for each use): a wrong index fails here, not in the middle of generation."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    host_state: dict[str, torch.Tensor] = {}
    read = 0
    with progress_bar(total=len(by_file), desc="load", quiet=quiet) as bar:
        for file, names in sorted(by_file.items()):
            path = out / file
            load = [n for n in names if targets[n] is not None]
            devs = {targets[n] for n in load}
            only = devs.pop() if len(devs) == 1 else None
            open_on = str(only) if only is not None and only.type == "cuda" else "cpu"  # straight to that GPU
            try:
                with safe_open(str(path), framework="pt", device=open_on) as f:
                    present = set(f.keys())
                    absent = [n for n in names if n not in present]
                    if absent:
                        raise VerificationError(f"{path}: no tensor {absent[0]}, which {INDEX} places in this file")
                    tensors = {n: f.get_tensor(n).to(device=targets[n], dtype=dtype) for n in load}
            except (OSError, SafetensorError) as e:
                raise VerificationError(f"{path}: cannot read it as safetensors ({e})") from None
            if tensors:
                if main_device.type == "cuda":
                    host_state.update({n: t for n, t in tensors.items() if t.device.type == "cpu"})
                model.load_state_dict(tensors, strict=False, assign=True)
                read += path.stat().st_size
            del tensors
            bar.update(1)
    return read, host_state
