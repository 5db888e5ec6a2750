"""`verify_model`: load a merged folder into neoxconv's layers, generate, and run checks that catch a bad merge.

Checks (each with its figure and tolerance; any failure makes the CLI exit 7):
* integrity     manifest, file sizes, hashes (small models by default), safetensors headers vs config/index;
                done before any model is built
* kv_cache      max |logits of cached step-by-step decoding - logits of one uncached forward|
* against       max |merged model's prompt logits - a simulated tensor-parallel forward over the unmerged
                rank shards| (``--against SRC``): catches a wrong merge rule
* reference_hf  max |neoxconv logits - transformers' GPTNeoXForCausalLM.from_pretrained(OUT) logits|
* sanity        logits finite and not constant over the vocabulary
* int8_*        with ``--int8``: top-1 agreement with the full-precision model over the generated steps,
                max logit difference on the prompt, weight memory before and after
* perplexity_against, perplexity_hf
                with ``--text FILE``: |log perplexity of neoxconv's model - that of the simulated
                tensor-parallel forward / of transformers| on the text (windows: `neoxconv.check.perplexity`)
Reward models (``*ForSequenceClassification``, gpt-neox ``train_impl: rm``) are scored instead of generating:
``score`` is the score of the prompt's last non-pad token; kv_cache, against and reference_hf compare scores.
Logit tolerances scale with max(1, max |logit|) and depend on the compute dtype. ``against`` compares with
the source's own weights, so when the merge rounded them (stored in a coarser dtype than the source's, read
from the safetensors headers) its tolerance is the coarser of the compute dtype and the stored one: a
``merge --dtype bf16`` checked in fp32 gets bf16's; an fp16 merge of an fp16 source keeps the tight one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from neoxconv.check.integrity import check_output
from neoxconv.check.perplexity import Perplexity, Windows, close_enough, model_perplexity, text_perplexity
from neoxconv.config import NeoXConfig, load_out_config
from neoxconv.dtypes import FROM_SAFETENSORS, TORCH_FLOAT_DTYPES, as_torch_dtype
from neoxconv.errors import CheckpointError, ConfigError, NeoXConvError, UsageError, VerificationError
from neoxconv.layers import last_non_pad, weight_bytes
from neoxconv.model.generation import GenerationResult, Sampling, full_forward_logits, generate
from neoxconv.model.kv_cache import KVCache
from neoxconv.output.folder import INDEX
from neoxconv.progress import format_bytes, format_rate, terminal_json, terminal_text
from neoxconv.runtime.loading import LoadedModel, load_model, resolve_device, resolve_dtype
from neoxconv.runtime.placement import PeakAnonMemory, PlacementPlan, runtime_reserve
from neoxconv.source.hf_folder import read_weight_map
from neoxconv.source.ptfile import TensorRef
from neoxconv.source.safetensors import read_safetensors_header

log = logging.getLogger(__name__)

# relative logit tolerances (x max(1, max|logit|)) per compute dtype
KV_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
MODEL_TOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 1.5e-1}
INT8_MIN_AGREEMENT = 0.5
# coarser precision ranks higher (mantissa bits: fp32 23, fp16 10, bf16 7)
_COARSENESS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass(frozen=True)
class VerifyOptions:
    prompt: str | None = None
    ids: tuple[int, ...] | None = None
    max_new_tokens: int = 32
    device: str = "auto"
    dtype: str = "auto"
    tokenizer: Path | None = None
    sampling: Sampling = Sampling()
    against: Path | None = None
    against_config: Path | None = None
    row_bias: str = "auto"
    qkv_layout: str = "auto"  # Llama-style GQA checkpoints: auto | blocked | interleaved (for --against)
    reference: str | None = None  # "hf"
    int8: bool = False
    int8_threshold: float = 6.0
    check_hashes: bool | None = None  # None: when the model is < 2 GB
    require_manifest: bool = True  # False: --no-manifest (a folder without neoxconv.json: headers only)
    attention: str = "eager"
    quiet: bool = True
    max_memory: dict | int | None = None  # bytes: one cap, or {cuda index | "cpu": bytes} (placement.parse_max_memory)
    device_map: str | None = None  # auto | balanced | sequential
    text: Path | None = None  # --text FILE: perplexity on it
    window: int | None = None  # perplexity window (None: max_position_embeddings)
    stride: int | None = None  # between window starts (None: window - 1)


# the prompt taken from --text when neither --prompt nor --ids is given
TEXT_PROMPT_TOKENS = 32


@dataclass
class PerplexityReport:
    """``verify --text``: the perplexity of each model on the text, over the same scored tokens."""

    text: str
    tokens: int  # tokens of the text
    scored: int  # tokens scored (all but the first)
    window: int
    stride: int
    ours: float  # perplexity of neoxconv's model
    nll: float  # its mean negative log-likelihood, nats per token
    against: float | None = None  # perplexity of the simulated tensor-parallel forward (--against)
    reference_hf: float | None = None  # of transformers (--reference hf)


@dataclass
class Check:
    name: str
    passed: bool
    value: float | None = None
    tolerance: float | None = None
    detail: str = ""


@dataclass
class VerifyReport:
    out_dir: str
    device: str
    dtype: str
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    checks: list[Check] = field(default_factory=list)
    kv_cache_max_abs_diff: float = float("nan")
    tokens_per_second: float = float("nan")
    prefill_seconds: float = float("nan")
    load_seconds: float = float("nan")
    weight_bytes: int = 0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    offloaded_bytes: int = 0
    device_map: dict[str, str] | None = None
    int8: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    # those of ``notes`` already given on stderr while the run went on (placement's: a streamed run of a big
    # model is long): not repeated at the end of the human report (`format_report`); not in --json
    notes_said: list[str] = field(default_factory=list)
    perplexity: PerplexityReport | None = None
    score: float | None = None  # reward models: the score of the last non-pad token of the prompt
    score_position: int | None = None  # its index in prompt_ids

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """The ``verify --json`` object. ``out`` names OUT as ``merge --json`` does; ``out_dir`` is the same
        value under its old name, kept for one release."""
        d = asdict(self)
        d["out"] = d["out_dir"]
        del d["notes_said"]
        d["ok"] = self.ok
        d["checks"] = {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in self.checks}
        return _finite_json(d)


def _finite_json(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite_json(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite_json(v) for v in o]
    return o


def _tokenizer(out: Path, explicit: Path | None):
    path = Path(explicit) if explicit else Path(out) / "tokenizer.json"
    if not path.is_file():
        if explicit:
            raise UsageError(f"{explicit}: no such tokenizer file (--tokenizer)")
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
        raise CheckpointError(f"{path}: cannot load the tokenizer: {e}") from None


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.float() - b.float()).abs()
    return float(d.max()) if d.numel() else 0.0


def _scale(t: torch.Tensor) -> float:
    return max(1.0, float(t.abs().max())) if t.numel() else 1.0


def _peak_memory(device: torch.device, sampler: PeakAnonMemory) -> tuple[int, str]:
    """CUDA: the allocator's peak over every GPU used; CPU: peak RssAnon (ru_maxrss where /proc has none)."""
    if device.type == "cuda":
        return sum(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())), \
            "cuda_max_memory_allocated"
    if sampler.supported:
        return sampler.peak, "rss_anon"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "ru_maxrss"


def stored_dtype(out: Path) -> torch.dtype | None:
    """The coarsest float dtype the merged weights are stored in, from the safetensors headers (None: unknown)."""
    try:
        files = set(read_weight_map(Path(out) / INDEX, VerificationError).values())
        dtypes = {FROM_SAFETENSORS.get(info.get("dtype")) for f in files
                  for name, info in read_safetensors_header(Path(out) / f).items() if name != "__metadata__"}
    except (NeoXConvError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # the integrity check has already named what is wrong with these files
    found = [as_torch_dtype(d) for d in dtypes if d in TORCH_FLOAT_DTYPES]
    return max(found, key=_COARSENESS.__getitem__, default=None)


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def coarser(a: torch.dtype, b: torch.dtype | None) -> torch.dtype:
    return a if b is None or _COARSENESS[a] >= _COARSENESS[b] else b


def merge_rounding(out: Path, options: VerifyOptions) -> tuple[torch.dtype, torch.dtype] | None:
    """(stored, source) dtypes when the merged weights are stored coarser than the ``--against`` source's,
    i.e. the merge rounded them; None when it did not (or a dtype is unknown)."""
    from neoxconv.source.checkpoint import open_checkpoint

    stored = stored_dtype(out)
    ckpt = open_checkpoint(options.against, config_path=options.against_config)
    names = {ref.dtype for ref in ckpt.tensors(ckpt.layers[0], 0).values()  # the embedding: metadata only
             if isinstance(ref, TensorRef)}  # (not a Transformer Engine `ExtraState`)
    source = [as_torch_dtype(d) for d in names if d in TORCH_FLOAT_DTYPES]
    if stored is None or len(source) != 1 or _COARSENESS[stored] <= _COARSENESS[source[0]]:
        return None
    return stored, source[0]


def require_optional(options: VerifyOptions) -> None:
    """Optional dependencies of the requested checks, checked before any work (UsageError: exit 2)."""
    if options.reference == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UsageError("--reference hf needs transformers: pip install 'neoxconv[hf]' "
                             "(or pip install transformers)") from None
    if options.int8:
        from neoxconv.model.int8 import require_bitsandbytes

        require_bitsandbytes()


def kv_cache_check(loaded: LoadedModel, gen: GenerationResult) -> tuple[Check, float]:
    """Cached logits (prefill + each decode step) vs one uncached forward over the same tokens."""
    seq = gen.prompt_ids + gen.generated_ids[:-1]
    full = full_forward_logits(loaded.model, seq, devices=loaded.devices)  # (P+N-1, V)
    cached = torch.cat([gen.prompt_logits, gen.step_logits[1:]]) if len(gen.step_logits) > 1 else gen.prompt_logits
    diff = _max_abs(cached, full)
    tol = KV_TOL[loaded.dtype] * _scale(full)
    return Check("kv_cache", diff <= tol, diff, tol, f"{len(seq)} positions, cached vs uncached"), diff


def sanity_check(gen: GenerationResult) -> Check:
    logits = torch.cat([gen.prompt_logits, gen.step_logits]) if len(gen.step_logits) else gen.prompt_logits
    finite = bool(torch.isfinite(logits).all())
    spread = float(logits.std(dim=-1).min()) if finite else float("nan")
    passed = finite and spread > 1e-6
    detail = "logits finite and varying" if passed else ("non-finite logits" if not finite else "constant logits")
    return Check("sanity", passed, spread, 1e-6, detail)


# what makes two configs different models (shapes); other differences are for the against check to judge
_MODEL_SHAPE = (("architecture", "architecture"), ("num_layers", "layers"), ("hidden_size", "hidden"),
                ("num_heads", "heads"), ("kv_heads", "kv heads"), ("ffn_size", "ffn"), ("vocab_size", "vocab"))


def check_against_config(out: Path, config: NeoXConfig, options: VerifyOptions) -> None:
    """Before anything is loaded: ``--against SRC`` must be the model OUT holds. A checkpoint of another model
    would fail the check with figures that look like a broken merge (top-1 agreement 0%); it is a ConfigError
    (exit 3) naming what differs, e.g. ``hidden 1024 vs 256``."""
    from neoxconv.source.checkpoint import open_checkpoint

    ckpt = open_checkpoint(options.against, config_path=options.against_config)
    src = ckpt.config
    emb = ckpt.tensors(ckpt.layers[0], 0).get("word_embeddings.weight")  # (V / T, H): the padded vocabulary
    if emb is None or len(emb.shape) != 2 or emb.shape[1] != src.hidden_size:
        return  # the shards do not fit their own config: the planner names the tensor (MergeError) when it runs
    src = src.with_(vocab_size=emb.shape[0] * ckpt.tp_degree)
    differ = [f"{label} {getattr(src, name)} vs {getattr(config, name)}" for name, label in _MODEL_SHAPE
              if getattr(src, name) is not None and getattr(config, name) is not None
              and getattr(src, name) != getattr(config, name)]
    if differ:
        raise ConfigError(f"--against {options.against}: this checkpoint's config ({ckpt.config_source}) does not "
                          f"match OUT's ({Path(out) / 'config.json'}): {', '.join(differ)} (checkpoint vs OUT); "
                          "it is another model: pass the checkpoint OUT was merged from, or --against-config FILE "
                          "when its config is elsewhere")


def against_check(model, gen: GenerationResult, options: VerifyOptions, dtype: torch.dtype,
                  rounding: tuple[torch.dtype, torch.dtype] | None = None, *, out: Path) -> Check:
    """``dtype``: the compute dtype; ``rounding``: (stored, source) dtypes when the merge rounded the weights.
    The simulation uses the source's own weights in fp32, so rounding widens the tolerance to its dtype's.
    Its QKV layout is the one the merge of ``out`` recorded; a pass never rests on an assumed one."""
    from neoxconv.check.tp_reference import against_reference

    reference = against_reference(options.against, gen.prompt_ids, out=out, row_bias=options.row_bias,
                                  config_path=options.against_config, qkv_layout=options.qkv_layout)
    tp_logits, layout_note = reference.logits, (f"; {reference.note}" if reference.note else "")
    ours = gen.prompt_logits
    if tp_logits.shape != ours.shape:
        return Check("against", False, None, None,
                     f"logit shapes differ: TP {list(tp_logits.shape)} vs {list(ours.shape)}")
    diff = _max_abs(ours, tp_logits)
    tol = MODEL_TOL[coarser(dtype, rounding[0] if rounding else None)] * _scale(tp_logits)
    agree = float((ours.argmax(-1) == tp_logits.argmax(-1)).float().mean())
    stored = (f"; weights stored in {_dtype_name(rounding[0])}, rounded from {_dtype_name(rounding[1])}"
              if rounding else "")
    return Check("against", diff <= tol and reference.trusted, diff, tol,
                 f"vs simulated tensor-parallel forward of {options.against} (top-1 agreement {agree:.0%}{stored})"
                 + layout_note)


@contextlib.contextmanager
def transformers_model(out: Path, config: NeoXConfig, dtype: torch.dtype, device: torch.device,
                       plan: PlacementPlan | None = None, *,
                       quiet: bool = False) -> Iterator[tuple[torch.nn.Module, torch.device]]:
    """transformers' class that config.json names, loaded from OUT: (model, the device its inputs go to).
    ``plan``: the placement of neoxconv's model, given to transformers' too (None: resident on ``device``);
    ``quiet``: without transformers' loading bar."""
    import transformers

    hf_class = getattr(transformers, config.hf_architecture)
    if plan is None:
        with _transformers_bars(shown=not quiet):
            hf = hf_class.from_pretrained(str(out), dtype=dtype).to(device).eval()
        try:
            yield hf, device
        finally:
            del hf
        return
    from neoxconv.runtime.placement import hf_device_map  # the same placement (accelerate under from_pretrained)

    with tempfile.TemporaryDirectory(prefix="neoxconv-offload-") as offload:
        device_map = hf_device_map(plan, hf_class=hf_class, out=out)
        with _transformers_bars(shown=not quiet):
            hf = hf_class.from_pretrained(str(out), dtype=dtype, device_map=device_map,
                                          offload_folder=offload).eval()
        try:
            yield hf, plan.main_device
        finally:
            del hf


@contextlib.contextmanager
def _transformers_bars(*, shown: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") on or off for a block; restored after."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if shown:
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            hf_logging.enable_progress_bar()


def reference_hf_check(hf: torch.nn.Module, inputs: torch.device, gen: GenerationResult, dtype: torch.dtype,
                       config: NeoXConfig) -> Check:
    """neoxconv's prompt logits vs transformers' (``hf``, from `transformers_model`); for a reward model, the
    score of the last non-pad token vs transformers' pooled score."""
    with torch.inference_mode():
        theirs = hf(torch.tensor([gen.prompt_ids], device=inputs)).logits[0].float().cpu()
    name = config.hf_architecture
    if config.reward_model:  # transformers pools: (num_labels,) at the last non-pad token
        pos = last_non_pad(gen.prompt_ids, config.pad_token_id)
        ours = gen.prompt_logits[pos]
        detail = f"vs transformers {name}'s score (position {pos}, the last non-pad token)"
    else:
        ours, detail = gen.prompt_logits, f"vs transformers {name} on the prompt"
    if ours.shape != theirs.shape:
        return Check("reference_hf", False, None, None, f"shapes differ: ours {list(ours.shape)}, "
                     f"transformers {list(theirs.shape)}")
    diff = _max_abs(ours, theirs)
    tol = MODEL_TOL[dtype] * _scale(theirs)
    return Check("reference_hf", diff <= tol, diff, tol, detail)


@torch.inference_mode()
def cached_scores(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """A reward model's scores (T, 1) through its KV cache: the first half of ``ids`` at once, then one token at
    a time (what an uncached forward must equal)."""
    model, devices = loaded.model, loaded.devices
    cache = KVCache(model.config, batch=1, max_len=len(ids), device=devices.inputs, dtype=loaded.dtype,
                    layer_devices=list(devices.layers))
    half = max(1, len(ids) // 2)
    parts = [model(torch.tensor([ids[:half]], device=devices.inputs), 0, cache)[0]]
    parts += [model(torch.tensor([[t]], device=devices.inputs), i, cache)[0] for i, t in enumerate(ids[half:], half)]
    return torch.cat(parts).float().cpu()


def score_prompt(loaded: LoadedModel, prompt_ids: list[int]) -> tuple[GenerationResult, Check, Check]:
    """A reward model on the prompt: its scores (uncached, as ``prompt_logits`` of a result without generated
    tokens), the kv_cache check (cached vs uncached scores) and the sanity check (finite)."""
    t0 = time.perf_counter()
    full = full_forward_logits(loaded.model, prompt_ids, devices=loaded.devices)  # (T, 1)
    seconds = time.perf_counter() - t0
    cached = cached_scores(loaded, prompt_ids)
    diff = _max_abs(cached, full)
    tol = KV_TOL[loaded.dtype] * _scale(full)
    kv = Check("kv_cache", diff <= tol, diff, tol, f"{len(prompt_ids)} positions, cached vs uncached scores")
    finite = bool(torch.isfinite(full).all())
    sanity = Check("sanity", finite, float(full.abs().max()) if finite else None, None,
                   "scores finite" if finite else "non-finite scores")
    gen = GenerationResult(prompt_ids=list(prompt_ids), generated_ids=[], prompt_logits=full,
                           step_logits=torch.empty(0), prefill_seconds=seconds, decode_seconds=0.0)
    return gen, kv, sanity


def int8_checks(loaded: LoadedModel, gen: GenerationResult, options: VerifyOptions) -> tuple[list[Check], dict]:
    from neoxconv.model.int8 import int8_weight_bytes, quantize_int8

    if loaded.placement is None:
        before = weight_bytes(loaded.model)
        quantize_int8(loaded.model, threshold=options.int8_threshold)
        after = int8_weight_bytes(loaded.model)
    else:  # offloaded weights are not resident: compare the whole model's bytes, computed from the shapes
        from neoxconv.runtime.placement import quantize_int8_placed

        before = sum(loaded.placement.unit_bytes.values())
        size = torch.finfo(loaded.dtype).bits // 8
        lins = [blk.get_submodule(p) for blk in loaded.model.blocks for p in loaded.model.LINEARS]
        after = before - sum(lin.weight.numel() * (size - 1) - lin.out_features * 4 for lin in lins)
        quantize_int8_placed(loaded.model, loaded.placement, threshold=options.int8_threshold)
    seq = gen.prompt_ids + gen.generated_ids[:-1]
    # teacher-forced on the full-precision tokens
    logits = full_forward_logits(loaded.model, seq, devices=loaded.devices)
    P = len(gen.prompt_ids)
    steps = logits[P - 1:]
    agreement = (float((steps.argmax(-1) == torch.tensor(gen.generated_ids)).float().mean())
                 if gen.generated_ids else 1.0)
    prompt_diff = _max_abs(logits[:P], gen.prompt_logits)
    int8_gen = generate(loaded.model, gen.prompt_ids, max_new_tokens=len(gen.generated_ids) or 1,
                        sampling=Sampling(), dtype=loaded.dtype, devices=loaded.devices)
    info = {"weight_bytes_before": before, "weight_bytes_after": after, "memory_ratio": after / before,
            "top1_agreement": agreement, "prompt_max_abs_logit_diff": prompt_diff,
            "tokens_per_second": int8_gen.decode_tokens_per_second, "threshold": options.int8_threshold}
    checks = [
        Check("int8_top1_agreement", agreement >= INT8_MIN_AGREEMENT, agreement, INT8_MIN_AGREEMENT,
              f"int8 vs full precision over {len(gen.generated_ids)} generated steps (minimum shown)"),
        Check("int8_memory", after < before, after / before, 1.0,
              f"weights {format_bytes(before)} -> {format_bytes(after)}"),
    ]
    return checks, info


def _prompt_and_text(out: Path, options: VerifyOptions, config: NeoXConfig, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, the --text's ids or []), checked against the vocabulary and the positions."""
    if options.prompt is not None and options.ids is not None:
        raise UsageError("give the prompt as text (--prompt) or as token ids (--ids), not both")
    text_ids: list[int] = []
    if options.text is not None:
        if config.reward_model:
            raise UsageError(f"--text measures a language model's perplexity; {out} is a reward model "
                             f"({config.hf_architecture}), which scores sequences")
        if tokenizer is None:
            raise UsageError(f"{out}: no tokenizer.json to encode --text; pass --tokenizer FILE")
        try:
            text = Path(options.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{options.text}: cannot read the text (--text): {e}") from None
        text_ids = tokenizer.encode(text).ids
        if len(text_ids) < 2:
            raise UsageError(f"{options.text}: {len(text_ids)} token(s); a perplexity needs at least 2")
    if options.prompt is None and options.ids is None:
        if not text_ids:
            raise UsageError("give a prompt (--prompt TEXT) or token ids (--ids 1,2,3)")
        prompt_ids = text_ids[:min(TEXT_PROMPT_TOKENS, config.max_position_embeddings - 1)]
    elif options.ids is not None:
        prompt_ids = list(options.ids)
    else:
        if tokenizer is None:
            raise UsageError(f"{out}: no tokenizer.json to encode the prompt; pass --tokenizer FILE or --ids 1,2,3")
        prompt_ids = tokenizer.encode(options.prompt).ids
    if not prompt_ids:
        raise UsageError("the prompt encodes to no tokens (--prompt / --ids)")
    for source, ids in (("prompt", prompt_ids), ("text", text_ids)):
        bad = [i for i in ids if not 0 <= i < (config.vocab_size or 0)]
        if not bad:
            continue
        if source == "prompt" and options.ids is not None:
            where, hint = "--ids: token ids", ""
        else:
            flag = "--text" if source == "text" or options.prompt is None else "--prompt"
            where = f"{flag}: the tokenizer ({options.tokenizer or out / 'tokenizer.json'}) gives ids"
            hint = "; the tokenizer does not match the model: pass --tokenizer FILE"
        raise UsageError(f"{where} {bad[:5]} outside the vocabulary of {out} "
                         f"(size {config.vocab_size}: ids 0..{(config.vocab_size or 1) - 1}){hint}")
    if len(prompt_ids) >= config.max_position_embeddings:
        raise UsageError(f"the prompt has {len(prompt_ids)} tokens; {out} takes at most "
                         f"{config.max_position_embeddings - 1} before generating (max_position_embeddings "
                         f"{config.max_position_embeddings}); give a shorter --prompt / --ids")
    return prompt_ids, text_ids


def verify_model(out: Path, options: VerifyOptions) -> VerifyReport:
    """Integrity first, then load, generate (a reward model: score), and run every requested check."""
    out = Path(out)
    if options.prompt is not None and options.ids is not None:
        raise UsageError("give the prompt as text (--prompt) or as token ids (--ids), not both")
    if options.prompt is None and options.ids is None and options.text is None:
        raise UsageError("give a prompt (--prompt TEXT) or token ids (--ids 1,2,3)")
    require_optional(options)
    config = load_out_config(out)
    windows = Windows.for_model(config, window=options.window, stride=options.stride) if options.text else None
    if config.reward_model and options.int8:
        raise UsageError(f"--int8 compares generated tokens; {out} is a reward model ({config.hf_architecture})")
    integrity = check_output(out, config, hashes=options.check_hashes, require_manifest=options.require_manifest)
    if options.against is not None:
        check_against_config(out, config, options)
    tokenizer = _tokenizer(out, options.tokenizer)
    prompt_ids, text_ids = _prompt_and_text(out, options, config, tokenizer)

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    sampler = PeakAnonMemory().start()  # stops at stop(), or when dropped on an error
    tokens = min(len(prompt_ids) + options.max_new_tokens, config.max_position_embeddings)  # as generate caps it
    if windows is not None:
        tokens = max(tokens, min(windows.window, len(text_ids)))
    reserve = runtime_reserve(config, tokens=tokens, dtype=dtype)
    loaded = load_model(out, device=device, dtype=dtype, quiet=options.quiet, max_memory=options.max_memory,
                        device_map=options.device_map, fit=True, reserve=reserve)
    loaded.model.set_attention(options.attention)
    if config.reward_model:
        gen, kv, sanity = score_prompt(loaded, prompt_ids)
    else:
        gen = generate(loaded.model, prompt_ids, max_new_tokens=options.max_new_tokens, eos_id=config.eos_token_id,
                       sampling=options.sampling, dtype=dtype, devices=loaded.devices)
    text = tokenizer.decode(gen.generated_ids) if tokenizer is not None and gen.generated_ids else ""
    report = VerifyReport(
        out_dir=str(out), device=str(device), dtype=str(dtype).replace("torch.", ""), prompt_ids=prompt_ids,
        generated_ids=gen.generated_ids, text=text, tokens_per_second=gen.decode_tokens_per_second,
        prefill_seconds=gen.prefill_seconds, load_seconds=loaded.load_seconds, weight_bytes=loaded.weight_bytes,
    )
    if loaded.placement is not None:
        report.offloaded_bytes, report.device_map = loaded.placement.offloaded_bytes, loaded.placement.to_json()
        report.notes.extend(loaded.placement.notes)
        report.notes_said.extend(loaded.placement.notes)  # logged when planned
    report.checks.append(Check("integrity", True, None, None, integrity.summary()))
    if config.reward_model:
        report.score_position = last_non_pad(prompt_ids, config.pad_token_id)
        report.score = float(gen.prompt_logits[report.score_position, 0])
        report.checks += [kv, sanity]
        report.kv_cache_max_abs_diff = kv.value if kv.value is not None else float("nan")
    else:
        kv, report.kv_cache_max_abs_diff = kv_cache_check(loaded, gen)
        report.checks.append(kv)
        report.checks.append(sanity_check(gen))
    ours_ppl = model_perplexity(loaded.model, text_ids, windows, devices=loaded.devices, dtype=dtype) \
        if windows is not None else None
    ppl_tol = MODEL_TOL[dtype]  # nats per token: |log ppl - log ppl'|
    if options.against is not None:
        rounding = merge_rounding(out, options)
        report.checks.append(against_check(loaded.model, gen, options, dtype, rounding, out=out))
        if ours_ppl is not None:
            tp_ppl = text_perplexity(text_ids, windows, lambda ids: _against_logits(options, ids, out))
            tol = MODEL_TOL[coarser(dtype, rounding[0] if rounding else None)]
            report.checks.append(_perplexity_check("perplexity_against", ours_ppl, tp_ppl, tol,
                                                   f"the simulated tensor-parallel forward of {options.against}"))
            report.perplexity = _ppl_report(options, text_ids, windows, ours_ppl, report.perplexity)
            report.perplexity.against = tp_ppl.perplexity
    if options.reference == "hf":
        with transformers_model(out, config, dtype, device, loaded.placement, quiet=options.quiet) as (hf, inputs):
            report.checks.append(reference_hf_check(hf, inputs, gen, dtype, config))
            if ours_ppl is not None:
                hf_ppl = text_perplexity(text_ids, windows, lambda ids: _hf_logits(hf, inputs, ids))
                report.checks.append(_perplexity_check("perplexity_hf", ours_ppl, hf_ppl, ppl_tol,
                                                       f"transformers {config.hf_architecture}"))
                report.perplexity = _ppl_report(options, text_ids, windows, ours_ppl, report.perplexity)
                report.perplexity.reference_hf = hf_ppl.perplexity
    if ours_ppl is not None:
        report.perplexity = _ppl_report(options, text_ids, windows, ours_ppl, report.perplexity)
    if options.int8:
        checks, report.int8 = int8_checks(loaded, gen, options)
        report.checks.extend(checks)
    report.peak_memory_bytes, report.peak_memory_kind = _peak_memory(device, sampler.stop())
    if tokenizer is None and not config.reward_model:
        report.notes.append("no tokenizer: generated ids are not decoded")
    if options.prompt is None and options.ids is None:
        report.notes.append(f"no --prompt/--ids: the prompt is the text's first {len(prompt_ids)} tokens")
    return report


def _against_logits(options: VerifyOptions, ids: list[int], out: Path) -> torch.Tensor:
    from neoxconv.check.tp_reference import against_reference

    return against_reference(options.against, ids, out=out, row_bias=options.row_bias,
                             config_path=options.against_config, qkv_layout=options.qkv_layout).logits


@torch.inference_mode()
def _hf_logits(hf: torch.nn.Module, inputs: torch.device, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids], device=inputs)).logits[0].float()


def _ppl_report(options: VerifyOptions, text_ids: list[int], windows: Windows, ours: Perplexity,
                existing: PerplexityReport | None) -> PerplexityReport:
    if existing is not None:
        return existing
    return PerplexityReport(text=str(options.text), tokens=len(text_ids), scored=ours.tokens, window=windows.window,
                            stride=windows.stride, ours=ours.perplexity, nll=ours.mean_nll)


def _perplexity_check(name: str, ours: Perplexity, theirs: Perplexity, tolerance: float, what: str) -> Check:
    agree, diff = close_enough(ours, theirs, tolerance)
    return Check(name, agree, diff, tolerance,
                 f"perplexity {ours.perplexity:.4g} vs {theirs.perplexity:.4g} of {what} over {ours.tokens} tokens "
                 "(|difference of log perplexities|, nats/token)")


def format_report(report: VerifyReport) -> str:
    lines = [
        f"prompt ids ({len(report.prompt_ids)}): {report.prompt_ids[:16]}"
        f"{' ...' if len(report.prompt_ids) > 16 else ''}",
        f"generated ({len(report.generated_ids)} tokens): {report.text!r}" if report.text
        else f"generated ids: {report.generated_ids}",
        f"device {report.device}, dtype {report.dtype}; load {report.load_seconds:.2f} s, prefill "
        f"{report.prefill_seconds * 1e3:.1f} ms, decode {format_rate(report.tokens_per_second, 'tokens/s')}, "
        f"weights {format_bytes(report.weight_bytes)}, peak memory {format_bytes(report.peak_memory_bytes)}"
        + (f", {format_bytes(report.offloaded_bytes)} streamed from disk/CPU per forward"
           if report.offloaded_bytes else ""),
        "",
        "checks:",
    ]
    for c in report.checks:
        mark = "✓" if c.passed else "✗"
        fig = "" if c.value is None else f"{c.value:.3g}"
        tol = "" if c.tolerance is None else f" (tolerance {c.tolerance:.3g})"
        lines.append(f"  {mark} {c.name:<20} {fig}{tol}  {c.detail}")
    if report.score is not None:
        lines.insert(1, f"score (reward model, token {report.score_position}): {report.score:.6g}")
    if report.perplexity is not None:
        pp = report.perplexity
        others = "".join(f", {k} {v:.6g}" for k, v in (("against", pp.against), ("reference_hf", pp.reference_hf))
                         if v is not None)
        lines.append(f"perplexity of {pp.text}: {pp.ours:.6g} ({pp.scored} tokens scored of {pp.tokens}, window "
                     f"{pp.window}, stride {pp.stride}){others}")
    if report.int8:
        i = report.int8
        lines.append(f"int8: weights x{i['memory_ratio']:.2f}, top-1 agreement {i['top1_agreement']:.0%}, "
                     f"prompt max |dlogit| {i['prompt_max_abs_logit_diff']:.3g}, "
                     f"{format_rate(i['tokens_per_second'], 'tokens/s')}")
    if report.device_map:
        where: dict[str, int] = {}
        for dev in report.device_map.values():
            where[dev] = where.get(dev, 0) + 1
        lines.append("device map: " + ", ".join(f"{n} stage(s) on {dev}" for dev, n in where.items())
                     + (" (notes on the placement above)" if report.notes_said else ""))
    lines += [f"note: {n}" for n in report.notes if n not in report.notes_said]
    lines.append("all checks passed" if report.ok else "SOME CHECKS FAILED")
    # each line escaped on its own: text from input files (names in notes and details, decoded tokens) can
    # neither add a line (a forged "all checks passed") nor send a terminal escape sequence
    return "\n".join(terminal_text(line) for line in lines)


def report_json(report: VerifyReport) -> str:
    """One JSON object on one line; control characters in its strings escaped (`terminal_json`)."""
    return terminal_json(report.to_json())

