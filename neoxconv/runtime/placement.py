"""Verify at any size: place the model over GPUs, CPU RAM and disk (``--device-map``, ``--max-memory``).

Placement is accelerate's big-model inference: a device map over the model's stages (embedding, each
transformer layer, final norm, readout), ``dispatch_model`` to attach its hooks, and disk offload read
straight from the merged safetensors files (accelerate's ``offload_index`` with ``safetensors_file``
entries, cast to the compute dtype on load): a stage mapped to ``disk`` (or to ``cpu`` while computing on
a GPU) is brought to its execution device one module at a time, just before that module runs, and
dropped right after. The KV cache of each layer lives on that layer's execution device.

Three things are neoxconv's own, because accelerate does not do them:
* the device map itself (``plan_placement``): accelerate's ``infer_auto_device_map`` keeps room for the
  largest layer on every device, so a cap below the largest module (the fp32 embedding of a 50k vocabulary
  is ~400 MB at hidden 2048) maps *everything* to disk, and nothing stays resident. Here the cap bounds the
  weights kept resident between uses, first fit in execution order; a module larger than the cap is mapped
  to disk, brought in for its use and dropped after (with a note saying so);
* the offloaded embedding and readout (``RowStreamedEmbedding``, ``RowStreamedLinear``): accelerate brings
  in whole modules, i.e. all V rows of the embedding to look up one per token, and the whole (V, H) readout
  in the compute dtype (1.24 GB in fp32 for 20B); here the embedding reads only the rows it looks up and
  the readout is computed ``ROW_BLOCK_BYTES`` of rows at a time, so neither is ever whole in memory;
* int8 with offload on the CPU (``quantize_int8_placed``): accelerate re-quantizes ``Int8Params`` through
  ``cuda:0`` on every load, so an offloaded int8 linear on a CPU-only machine cannot be loaded by it.
  An offloaded linear gets a small accelerate ``ModelHook`` that quantizes the weights it loads
  (bitsandbytes' own quantizer, deterministic: the same int8 weights as a resident model) and drops them.

``peak_memory_bytes`` on the CPU is the process's peak *anonymous* memory (``RssAnon`` of
/proc/self/status, sampled every millisecond by ``PeakAnonMemory``): it leaves out the page cache of the
memory-mapped safetensors files, which the kernel can drop at any time, and counts what the run really
needed (weights cast to the compute dtype, activations, KV cache, logits).
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from neoxconv.config import NeoXConfig
from neoxconv.errors import NeoXConvError, UsageError, VerificationError
from neoxconv.model.generation import ExecutionDevices
from neoxconv.model.int8 import block_linears, int8_linear, require_bitsandbytes
from neoxconv.progress import format_bytes

log = logging.getLogger(__name__)


class PlacementError(UsageError):
    """--max-memory / --device-map ask for devices this run does not have (exit 2)."""


Device = int | str  # accelerate's spelling: a CUDA index, "cpu" or "disk"
DEVICE_MAPS = ("auto", "balanced", "sequential")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)


# ----- parsing --max-memory -------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'512MiB' -> 536870912, '20GB' -> 20e9 (KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB of 2)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 512MiB, 20GB, 1.5GiB)")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise ValueError(f"{text!r}: a memory cap must be positive")
    return n


def parse_max_memory(text: str) -> dict[Device, int] | int:
    """``SIZE`` (one cap for the compute device(s)) or ``DEV=SIZE,...`` with DEV a CUDA index or ``cpu``."""
    if "=" not in text:
        return parse_size(text)
    caps: dict[Device, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        dev, sep, size = part.partition("=")
        dev = dev.strip().lower()
        if not sep or not dev:
            raise ValueError(f"{part!r}: expected DEVICE=SIZE, e.g. 0=20GB,1=20GB,cpu=30GB")
        key: Device
        if dev == "cpu":
            key = "cpu"
        elif dev.isdigit():
            key = int(dev)
        elif dev.startswith("cuda:") and dev[5:].isdigit():
            key = int(dev[5:])
        else:
            raise ValueError(f"{dev!r} is not a device; use a CUDA index (0, 1, ...) or cpu")
        if key in caps:
            raise ValueError(f"device {dev} is given twice")
        caps[key] = parse_size(size)
    if not caps:
        raise ValueError("no DEVICE=SIZE pair given")
    return caps


# ----- memory available and used ---------------------------------------------------------------------------
def meminfo(key: str) -> int | None:
    """A /proc/meminfo entry in bytes (``MemAvailable``), or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_memory(device: Device) -> int:
    """Bytes the device can still take: CUDA free memory, or the host's MemAvailable."""
    if device == "cpu":
        avail = meminfo("MemAvailable")
        if avail is None:
            import psutil

            avail = int(psutil.virtual_memory().available)
        return avail
    free, _ = torch.cuda.mem_get_info(int(device))
    return int(free)


def rss_anon() -> int | None:
    """The process's resident anonymous memory (RssAnon), or None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakAnonMemory:
    """Peak RssAnon, sampled by a thread every ``interval`` seconds between ``start()`` and ``stop()``.

    The thread holds no reference to this object: dropping it (an exception between start and stop)
    stops the thread too.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self._peak = [0]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.supported = rss_anon() is not None

    @property
    def peak(self) -> int:
        return self._peak[0]

    @staticmethod
    def _sample(box: list[int]) -> None:
        now = rss_anon()
        if now is not None and now > box[0]:
            box[0] = now

    def start(self) -> PeakAnonMemory:
        self._sample(self._peak)
        if self.supported:
            stop, box, interval, sample = self._stop, self._peak, self.interval, self._sample

            def run() -> None:
                while not stop.wait(interval):
                    sample(box)

            self._thread = threading.Thread(target=run, name="neoxconv-peak-memory", daemon=True)
            self._thread.start()
            weakref.finalize(self, stop.set)
        return self

    def stop(self) -> PeakAnonMemory:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample(self._peak)
        return self

    def __enter__(self) -> PeakAnonMemory:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----- the plan ----------------------------------------------------------------------------------------------
@dataclass
class PlacementPlan:
    """Where each stage of the model lives. ``device_map`` uses accelerate's spelling (int, 'cpu', 'disk')."""

    device_map: dict[str, Device]
    main_device: torch.device
    caps: dict[Device, int]
    unit_bytes: dict[str, int]
    notes: list[str] = field(default_factory=list)
    units: dict[str, str] = field(default_factory=dict)  # the model class's UNITS (its module names)

    def execution_device(self, unit: str) -> torch.device:
        dev = self.device_map[unit]
        return self.main_device if dev in ("cpu", "disk") else torch.device("cuda", int(dev))

    @property
    def devices(self) -> ExecutionDevices:
        """Where generation runs: inputs on the main device, each layer (and its KV cache) on its execution device."""
        blocks = self.units["blocks"] + "."
        n = sum(1 for u in self.device_map if u.startswith(blocks))
        return ExecutionDevices(self.main_device, tuple(self.execution_device(f"{blocks}{i}") for i in range(n)))

    def unit_of(self, name: str) -> str:
        """The stage a tensor name belongs to."""
        for u in self.device_map:
            if name == u or name.startswith(u + "."):
                return u
        raise VerificationError(f"tensor {name} belongs to no stage of the model")

    def load_device(self, name: str) -> torch.device | None:
        """Where the loader puts a tensor: its stage's GPU, CPU RAM, or None (disk: read for each use)."""
        dev = self.device_map[self.unit_of(name)]
        if dev == "disk":
            return None
        return torch.device("cpu") if dev == "cpu" else torch.device("cuda", int(dev))

    @property
    def offloaded_units(self) -> list[str]:
        """Stages not resident on their execution device (disk, or CPU RAM while computing on a GPU)."""
        off = ("disk",) if self.main_device.type == "cpu" else ("disk", "cpu")
        return [u for u, d in self.device_map.items() if d in off]

    @property
    def offloaded_bytes(self) -> int:
        return sum(self.unit_bytes[u] for u in self.offloaded_units)

    def to_json(self) -> dict[str, str]:
        return {u: (f"cuda:{d}" if isinstance(d, int) else d) for u, d in self.device_map.items()}


def model_units(model: torch.nn.Module) -> list[str]:
    """The stages in execution order: the granularity of the device map (layers are never split)."""
    u = model.UNITS  # GPT-NeoX's or Llama's module names
    return ([u["embed"]] + [f"{u['blocks']}.{i}" for i in range(len(model.blocks))]
            + [u["final_norm"], u["readout"]])


def unit_sizes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Weight bytes of each stage in the compute dtype (a tied readout adds nothing to the embedding)."""
    size = torch.finfo(dtype).bits // 8
    readout, embed = model.UNITS["readout"], model.UNITS["embed"]
    tied = model.get_submodule(readout).weight is model.get_submodule(embed).weight
    return {u: 0 if (u == readout and tied) else
            sum(p.numel() for p in model.get_submodule(u).parameters()) * size
            for u in model_units(model)}


def largest_module_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the largest single module (Linear, Embedding, ...) in ``dtype``: what one use brings in."""
    size = torch.finfo(dtype).bits // 8
    return max((sum(p.numel() for p in m.parameters(recurse=False)) * size for m in model.modules()), default=0)


def runtime_reserve(config: NeoXConfig, *, tokens: int, dtype: torch.dtype) -> int:
    """Bytes beyond the weights that a verify run needs on its compute device: KV cache, logits, activations."""
    size = torch.finfo(dtype).bits // 8
    kv = 2 * config.num_layers * tokens * config.hidden_size * size
    logits = 4 * tokens * (config.vocab_size or 0) * 4  # fp32 logits, a few copies (checks, softmax)
    activations = 8 * tokens * max(config.ffn_size, config.hidden_size) * 4
    return kv + logits + activations + (256 << 20)  # + the allocator's and torch's own slack


def plan_placement(model: torch.nn.Module, *, dtype: torch.dtype, main_device: torch.device,
                   device_map: str | None = None, max_memory: dict[Device, int] | int | None = None,
                   reserve: int = 0) -> PlacementPlan | None:
    """The device map for this run, or None when the whole model stays resident on ``main_device``.

    * ``device_map`` None and ``max_memory`` None: None if the model fits the device (its available memory
      less ``reserve``); otherwise a cap of what is available, with a note saying so.
    * ``max_memory`` a size: the cap of each compute device (the CPU with --device cpu, every GPU in a map).
    * ``max_memory`` per device: those caps; devices not named get their available memory in a device map.
    * ``device_map`` auto/balanced: GPU budgets lowered so the layers spread evenly (accelerate's
      ``get_balanced_memory``); sequential: fill GPU 0, then 1, ... Then CPU RAM, then disk.
    """
    sizes = unit_sizes(model, dtype)
    total = sum(sizes.values())
    notes: list[str] = []
    on_gpu = main_device.type == "cuda"
    main: Device = (main_device.index or 0) if on_gpu else "cpu"
    if device_map is None and isinstance(max_memory, dict):
        device_map = "sequential"  # a per-device cap asks for a map
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise PlacementError(f"--device-map {device_map!r}: use one of {', '.join(DEVICE_MAPS)}")

    if device_map is None:
        if max_memory is None:
            avail = available_memory(main) - reserve
            if total <= avail:
                return None
            cap = max(avail - largest_module_bytes(model, dtype), 0)  # room for one streamed module in use
            notes.append(f"the model needs {format_bytes(total)} of weights in {str(dtype)[6:]}, {main_device} has "
                         f"{format_bytes(avail + reserve)} available: keeping at most {format_bytes(cap)} resident and "
                         "streaming the rest from disk layer by layer (choose with --max-memory)")
            caps: dict[Device, int] = {main: cap}
            if on_gpu:
                caps["cpu"] = max(available_memory("cpu") - reserve, 0)
        else:
            caps = {main: int(max_memory)}
        order: list[Device] = [main] + (["cpu"] if "cpu" in caps and main != "cpu" else [])
    else:
        gpus = list(range(torch.cuda.device_count())) if on_gpu else []
        named = max_memory if isinstance(max_memory, dict) else {}
        bad = [d for d in named if d != "cpu" and d not in gpus]
        if bad:
            raise PlacementError(f"--max-memory names device {bad[0]}, but this run's devices are "
                                f"{', '.join(map(str, gpus + ['cpu']))} (--device {main_device.type})")
        order = gpus + ["cpu"]
        caps = {}
        for d in order:
            if d in named:
                caps[d] = named[d]
            elif isinstance(max_memory, int) and (d != "cpu" or not on_gpu):
                caps[d] = max_memory
            else:
                caps[d] = max(available_memory(d) - (reserve if d == main else 0), 0)
        if device_map in ("auto", "balanced") and len(gpus) > 1:
            from accelerate.utils import get_balanced_memory

            caps.update(get_balanced_memory(model, max_memory=dict(caps), dtype=dtype,
                                            no_split_module_classes=[type(model.blocks[0]).__name__]))

    used = {d: 0 for d in order}
    placed: dict[str, Device] = {}
    largest_cap = max(caps[d] for d in order)
    for unit, size in sizes.items():
        if unit == model.UNITS["readout"] and size == 0:  # tied: wherever the embedding is
            placed[unit] = placed[model.UNITS["embed"]]
            continue
        for d in order:
            if used[d] + size <= caps[d]:
                placed[unit] = d
                used[d] += size
                break
        else:
            placed[unit] = "disk"
            if size > largest_cap:
                how = {model.UNITS["embed"]: "only the rows it looks up are read, for each use",
                       model.UNITS["readout"]: f"it is read {format_bytes(ROW_BLOCK_BYTES)} of rows at a time, "
                                               "for each use"}
                notes.append(f"{unit} ({format_bytes(size)}) is larger than the memory cap "
                             f"({format_bytes(largest_cap)}): "
                             + how.get(unit, "it is brought in for each use and dropped after"))
    placed["rotary"] = main  # cos/sin tables, not weights
    for note in notes:  # said now, not only in the report: a streamed run of a big model is long
        log.warning(note)
    plan = PlacementPlan(device_map=placed, main_device=main_device, caps={d: caps[d] for d in order},
                         unit_bytes=sizes, notes=notes, units=dict(model.UNITS))
    if plan.offloaded_units:
        log.info("streaming %s of weights from disk/CPU: %s", format_bytes(plan.offloaded_bytes),
                 ", ".join(plan.offloaded_units))
    return plan


# ----- loading and dispatching -----------------------------------------------------------------------------
ROW_BLOCK_BYTES = 64 * 10**6  # compute-dtype bytes of a streamed readout's rows in memory at a time


class _FileTensor:
    """One tensor of a safetensors file; each call gives a zero-copy view of the memory-mapped file."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name

    def __call__(self) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return f.get_tensor(self.name)


class RowStreamedEmbedding(torch.nn.Module):
    """An offloaded embedding that reads only the rows it looks up, straight from the mapped file.

    accelerate brings in whole modules: for the embedding that is every one of the V rows, to look up one.
    ``weight`` is a meta placeholder with the right shape and dtype.
    """

    def __init__(self, source: _FileTensor, *, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.source, self.device = source, device
        self.register_buffer("weight", torch.empty(shape, dtype=dtype, device="meta"), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        return self.source()[ids.cpu()].to(device=self.device, dtype=self.weight.dtype)


class RowStreamedLinear(torch.nn.Module):
    """An offloaded vocab-sized readout computed ``ROW_BLOCK_BYTES`` of weight rows at a time.

    accelerate would bring in the whole (V, H) weight in the compute dtype for every token (1.24 GB in fp32
    for 20B); here it is never whole in memory. No bias (the readout has none).
    """

    def __init__(self, source: _FileTensor, *, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.source, self.device = source, device
        self.register_buffer("weight", torch.empty(shape, dtype=dtype, device="meta"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, V)
        w = self.source()
        rows, width = w.shape
        block = max(1, ROW_BLOCK_BYTES // (width * self.weight.element_size()))
        x = x.to(self.device)
        return torch.cat([F.linear(x, w[i:i + block].to(device=self.device, dtype=self.weight.dtype))
                          for i in range(0, rows, block)], dim=-1)


def _stream_vocab_modules(model: torch.nn.Module, plan: PlacementPlan, weight_map: dict[str, str], out: Path,
                          dtype: torch.dtype) -> None:
    """Swap an offloaded embedding / readout for the row-streamed modules above (after dispatch)."""
    from accelerate.hooks import remove_hook_from_module

    embed, readout = model.UNITS["embed"], model.UNITS["readout"]
    tied = model.config.tie_word_embeddings
    for unit, cls in ((embed, RowStreamedEmbedding), (readout, RowStreamedLinear)):
        if plan.device_map.get(unit) != "disk":
            continue
        name = f"{embed}.weight" if (tied or unit == embed) else f"{readout}.weight"
        old = model.get_submodule(unit)
        remove_hook_from_module(old, recurse=True)
        new = cls(_FileTensor(out / weight_map[name], name), shape=tuple(old.weight.shape), dtype=dtype,
                  device=plan.main_device)
        parent, _, attr = unit.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)


def require_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise NeoXConvError("--max-memory/--device-map need accelerate: pip install accelerate") from None


def dispatch_placed(out: Path, model: torch.nn.Module, plan: PlacementPlan, *, weight_map: dict[str, str],
                    host_state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Attach accelerate's hooks to a model whose resident stages the loader has filled (``runtime.loading``):
    stages on disk are read from OUT's files for each use, ``host_state`` (tensors held in CPU RAM for a GPU
    run) moved to the GPU for each use; an offloaded embedding / readout is row-streamed."""
    from accelerate import dispatch_model

    offload_index = {name: {"safetensors_file": str(out / file), "weight_name": name,
                            "dtype": str(dtype).replace("torch.", "")}
                     for name, file in weight_map.items() if plan.load_device(name) is None}
    host_state = dict(host_state)
    if model.config.tie_word_embeddings:
        emb_w, out_w = f"{model.UNITS['embed']}.weight", f"{model.UNITS['readout']}.weight"
        for table in (offload_index, host_state):
            if emb_w in table:
                table[out_w] = table[emb_w]
    main = (plan.main_device.index or 0) if plan.main_device.type == "cuda" else "cpu"
    # accelerate warns about meta parameters for every offloaded model: that is the design here
    accelerate_log = logging.getLogger("accelerate.big_modeling")
    level = accelerate_log.level
    accelerate_log.setLevel(logging.ERROR)
    try:
        dispatch_model(model, dict(plan.device_map), main_device=main, state_dict=host_state or None,
                       offload_index=offload_index or None, force_hooks=True)
    finally:
        accelerate_log.setLevel(level)
    _stream_vocab_modules(model, plan, weight_map, out, dtype)


def hf_device_map(plan: PlacementPlan, *, hf_class: type, out: Path) -> dict[str, Device]:
    """The plan in transformers' module names, for ``from_pretrained(device_map=...)`` (reference_hf)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights():
        hf = hf_class(AutoConfig.from_pretrained(str(out)))
    children = {n for n, _ in hf.named_children()}
    ours = plan.units  # our module names: GPT-NeoX's or Llama's (equal to transformers' but the readout)
    readout = ours["readout"] if ours["readout"] in children else (  # a reward model's score: the same name
        "embed_out" if "embed_out" in children else "lm_head")  # GPT-NeoX in transformers 4.x / 5.x
    rename = {ours["readout"]: readout, "rotary": ours["hf_rotary"]}
    return {rename.get(u, u): d for u, d in plan.device_map.items()}


# ----- int8 with offload -------------------------------------------------------------------------------------
def quantize_int8_placed(model: torch.nn.Module, plan: PlacementPlan, *, threshold: float) -> None:
    """LLM.int8 for a model placed by ``plan``: resident linears are swapped as usual; offloaded ones quantize
    on load."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device
    from torch import nn

    bnb = require_bitsandbytes()

    class QuantizeOnLoad(ModelHook):
        """Load the linear's weights from the offload source, quantize them, run, drop them."""

        def __init__(self, weights, device: torch.device) -> None:
            self.weights, self.device = weights, device  # weights: accelerate's map, keys relative to the module

        def pre_forward(self, module, *args, **kwargs):
            w = self.weights["weight"].to("cpu", torch.float16)
            module.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(self.device)
            if module.bias is not None:
                module.bias = nn.Parameter(self.weights["bias"].to(self.device), requires_grad=False)
            args = tuple(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args)
            return args, kwargs

        def post_forward(self, module, output):
            module.weight = bnb.nn.Int8Params(torch.empty(module.weight.shape, dtype=torch.int8, device="meta"),
                                              requires_grad=False, has_fp16_weights=False)
            if module.bias is not None:
                set_module_tensor_to_device(module, "bias", "meta")
            return output

    for i, block in enumerate(model.blocks):
        unit = f"{model.UNITS['blocks']}.{i}"
        device = plan.execution_device(unit)
        for parent, name, lin in block_linears(model, block):
            hook = getattr(lin, "_hf_hook", None)
            weights = getattr(hook, "weights_map", None) if getattr(hook, "offload", False) else None
            q = int8_linear(bnb, lin, threshold=threshold, resident=weights is None)
            if weights is None:  # resident: quantize now, as int8.quantize_int8 does
                q = q.to(device)
                remove_hook_from_module(lin)
            else:
                add_hook_to_module(q, QuantizeOnLoad(weights, device))
                remove_hook_from_module(lin)
            setattr(parent, name, q)

