"""Write a GPT-NeoX (DeepSpeed) checkpoint: rank files, bookkeeping, the NeoX YAML, ``latest``; resumable.

What gpt-neox and DeepSpeed read when they load (checked against their source):

* ``latest`` names the tag folder when no tag is given (``DeepSpeedEngine.load_checkpoint``);
* ``mp_rank_{r:02d}_model_states.pt`` is loaded by every engine (``_load_checkpoint``). With
  ``load_module_only`` (gpt-neox sets it under ``finetune`` or ``no_load_optim``) DeepSpeed reads only
  ``module`` (the weights in the sequential layout; ``None`` in the pipeline layout, whose weights are in
  the layer files, read by ``PipelineModule.load_state_dir``) and ``dp_world_size``; otherwise also
  ``global_steps``, ``skipped_steps`` and ``mp_world_size``. gpt-neox then reads ``iteration`` (unless
  ``finetune``), checks ``args`` if present, and restores RNG states unless ``finetune`` / ``no_load_rng``.
  So the files hold exactly those keys, as Python ints and ``None``: no class outside torch/builtins, and
  every file loads with ``torch.load(weights_only=True)``. There is no optimizer state and no RNG state:
  gpt-neox loads these checkpoints with ``finetune: true`` (iteration restarts at 0), or with
  ``no_load_optim: true`` and ``no_load_rng: true`` (iteration continues from ``--step``).
* ``layer_{idx:02d}-model_{r:02d}-model_states.pt``: one plain dict of tensors per pipeline layer and
  rank, each tensor its own storage (a view would drag its whole base storage into the file).

Files are written to a temporary name, fsynced and renamed; a journal records every finished file with its
sha256 so an interrupted run resumes; the manifest ``neoxconv-neox.json`` is written last.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neoxconv import __version__
from neoxconv.checkpoint import SourceLayer, model_layers, pipeline_file_name, sequential_file_name
from neoxconv.config import GELU_TANH, NeoXConfig, padded_vocab_size
from neoxconv.errors import ConfigError, OutputError
from neoxconv.interrupt import InterruptGuard
from neoxconv.progress import progress_bar
from neoxconv.writer import TMP_SUFFIX, atomic_write, atomic_write_json, fsync_dir, sha256_file

JOURNAL = ".neoxconv-journal.json"
MANIFEST = "neoxconv-neox.json"
CONFIG_NAME = "neox.yml"
LAYOUTS = ("pipeline", "sequential")
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_PRECISION = {"float16": "fp16", "bfloat16": "bfloat16", "float32": "fp32"}

# One source layer's tensors for one rank: NeoX key -> tensor (each its own storage).
Shard = dict[str, torch.Tensor]


@dataclass(frozen=True)
class NeoXTarget:
    """What to write: the model, the TP degree, the layout, the dtype and the step."""

    config: NeoXConfig
    tp_degree: int
    layout: str = "pipeline"
    dtype: str = "float16"
    step: int = 0
    tokenizer_size: int | None = None  # entries in the tokenizer, when known (for the vocab padding rule)

    @property
    def step_name(self) -> str:
        return f"global_step{self.step}"

    @property
    def layers(self) -> list[SourceLayer]:
        return model_layers(self.config, with_readout=not self.config.tie_word_embeddings)


@dataclass
class WriteReport:
    out_dir: Path
    tp_degree: int
    layout: str
    step: int
    files_written: int
    files_reused: int
    total_bytes: int
    make_vocab_size_divisible_by: int
    dtype: str = ""
    row_bias: str = ""  # how row-parallel biases were split: "rank0" (parts that sum) or "replicated"
    bytes_written: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` object (the same key names as ``merge --json`` where they mean the same)."""
        return {"out": str(self.out_dir), "tp_degree": self.tp_degree, "layout": self.layout, "step": self.step,
                "dtype": self.dtype, "row_bias": self.row_bias, "files_written": self.files_written,
                "files_reused": self.files_reused, "bytes_written": self.bytes_written, "total_size": self.total_bytes,
                "seconds": round(self.seconds, 3), "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
                "warnings": list(self.warnings)}


def check_target(target: NeoXTarget, *, where: str) -> None:
    """Every reason the model cannot be written at this TP degree / layout, as one ConfigError (exit 3)."""
    if target.tp_degree < 1:
        raise ConfigError(f"--tp must be at least 1, got {target.tp_degree}")
    if target.layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {target.layout!r}")
    if target.step < 0:
        raise ConfigError(f"--step must not be negative, got {target.step}")
    problems = target.config.tp_model_parallel_check(target.tp_degree)
    if problems:
        raise ConfigError(f"{where}: cannot split {target.tp_degree} ways: " + "; ".join(problems)
                          + f" (choose a --tp that divides them)")


# ----- the NeoX YAML -------------------------------------------------------------------------------------
def vocab_divisor(rows: int, tp: int, tokenizer_size: int | None) -> int:
    """``make_vocab_size_divisible_by`` such that gpt-neox's own padding lands on ``rows`` embedding rows.

    gpt-neox pads the tokenizer's size up to a multiple of divisible_by x TP. The default 128 is kept when it
    gives ``rows`` for the known tokenizer; otherwise rows / TP, which gives ``rows`` for any tokenizer of
    at most ``rows`` entries (e.g. 50432 rows at TP 4: 128 would give 50688, 12608 gives 50432).
    """
    if tokenizer_size is not None and 0 < tokenizer_size <= rows and \
            padded_vocab_size(tokenizer_size, divisible_by=128, tp_degree=tp) == rows:
        return 128
    return rows // tp


def _yaml_float(x: float) -> str:
    """A float YAML 1.1 reads as a float: PyYAML needs a dot in the mantissa (``1e-05`` is a string)."""
    text = repr(float(x))
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def neox_yaml(target: NeoXTarget, divisible_by: int) -> str:
    """A NeoX config gpt-neox accepts and ``neoxconv merge`` reads back (JSON-style YAML, as gpt-neox ships)."""
    c = target.config
    b = lambda v: "true" if v else "false"  # noqa: E731
    precision = _PRECISION[target.dtype]
    lines = [
        "# GPT-NeoX config written by neoxconv: the model's settings for the checkpoint in this folder.",
        "# Add your training settings (data, optimizer, batch sizes) in another config file; set 'load' to this",
        "# folder. The checkpoint has no optimizer or RNG state: keep 'finetune: true' (iteration restarts at 0)",
        "# or replace it by 'no_load_optim: true' and 'no_load_rng: true' (iteration continues from the step).",
        "{",
        f'  "pipe-parallel-size": {1 if target.layout == "pipeline" else 0},',
        f'  "model-parallel-size": {target.tp_degree},',
        "",
        f'  "num-layers": {c.num_layers},',
        f'  "hidden-size": {c.hidden_size},',
        f'  "num-attention-heads": {c.num_heads},',
    ]
    if c.ffn_size != 4 * c.hidden_size:
        lines.append(f'  "intermediate_size": {c.ffn_size},')
    lines += [
        f'  "seq-length": {c.max_position_embeddings},',
        f'  "max-position-embeddings": {c.max_position_embeddings},',
        '  "norm": "layernorm",',
        f'  "layernorm-epsilon": {_yaml_float(c.layernorm_eps)},',
        '  "pos-emb": "rotary",',
        f'  "rotary_pct": {_yaml_float(c.rotary_pct)},',
        f'  "rotary_emb_base": {int(c.rotary_emb_base) if float(c.rotary_emb_base).is_integer() else _yaml_float(c.rotary_emb_base)},',
        '  "rotary_save_freqs_buffer": true,  # the block files carry attention.rotary_emb.inv_freq',
        f'  "no-weight-tying": {b(not c.tie_word_embeddings)},',
        f'  "gpt_j_residual": {b(c.parallel_residual)},',
        '  "output_layer_parallelism": "column",',
        '  "activation": "gelu",',
        f'  "bias-gelu-fusion": {b(c.activation == GELU_TANH)},  # true: the tanh GELU (gelu_fast)',
        f'  "make_vocab_size_divisible_by": {divisible_by},  # pads the vocabulary to {c.vocab_size} rows',
        "",
        f'  "precision": "{precision}",',
    ]
    if precision == "fp16":
        lines.append('  "fp16": { "enabled": true, "loss_scale": 0 },')
    elif precision == "bfloat16":
        lines.append('  "bf16": { "enabled": true },')
    lines += ['  "finetune": true,', "}", ""]
    return "\n".join(lines)


# ----- files ---------------------------------------------------------------------------------------------
def _output_error(path: Path, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on the device; free some space and re-run the same command to resume")
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


STAGING = ".staging" + TMP_SUFFIX  # a hidden folder beside the files; removed when a run ends


def save_pt(path: Path, obj: Any) -> tuple[str, int]:
    """``torch.save`` atomically; returns (sha256, size).

    The file is written under its final name inside a hidden staging folder, fsynced, then renamed into
    place: torch names the records inside the archive after the file (``layer_02-model_00-model_states/``),
    so the archive is exactly what ``torch.save(obj, path)`` writes.
    """
    staging = path.parent / STAGING
    tmp = staging / path.name
    try:
        staging.mkdir(exist_ok=True)
        torch.save(obj, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _output_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return sha256_file(path), path.stat().st_size


def _remove_stale(d: Path) -> None:
    for stale in d.glob(f".*{TMP_SUFFIX}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def bookkeeping(target: NeoXTarget, module: Shard | None) -> dict[str, Any]:
    """What DeepSpeed and gpt-neox read from ``mp_rank_XX_model_states.pt`` (ints and None only)."""
    return {
        "module": module, "buffer_names": [], "global_steps": target.step, "global_samples": 0,
        "skipped_steps": 0, "iteration": target.step, "mp_world_size": target.tp_degree, "dp_world_size": 1,
    }


def shard_bytes(shard: Shard) -> int:
    return sum(t.numel() * t.element_size() for t in shard.values())


# ----- the job: journal, resume, files, manifest -----------------------------------------------------------
def _load_state(out: Path) -> dict[str, Any] | None:
    for name in (JOURNAL, MANIFEST):
        p = out / name
        if p.is_file():
            try:
                state = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(state, dict) and state.get("tool") == "neoxconv" and state.get("kind") == "neox":
                return state
    return None


def _prepare_out(out: Path, source: dict, recorded: dict, *, resume: bool, force: bool) -> dict[str, Any]:
    """Check OUT is safe to write; return the finished files that may be kept ({name: {sha256, size}})."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    state = _load_state(out) if out.is_dir() else None
    entries = list(out.iterdir()) if out.is_dir() else []
    if state is None:
        if entries and not force:
            raise OutputError(f"{out}: the folder is not empty and is not a neoxconv NeoX output; choose an empty "
                              "folder or pass --force (neoxconv only overwrites the files it writes)")
        return {}
    same = state.get("source") == source and state.get("options") == recorded
    if not same and state.get("files") and not force:
        raise OutputError(f"{out}: holds a neoxconv output of another source or other options "
                          f"({state.get('options')}); choose another folder or pass --force to overwrite it")
    if not same:
        for name in [*state.get("files", {}), MANIFEST, JOURNAL]:
            parts = Path(name).parts
            if not Path(name).is_absolute() and ".." not in parts and len(parts) <= 2:  # our names only
                (out / name).unlink(missing_ok=True)
        return {}
    return dict(state.get("files", {})) if resume else {}


def _is_done(out: Path, name: str, entry: dict | None) -> bool:
    p = out / name
    return bool(entry) and p.is_file() and p.stat().st_size == entry.get("size") and sha256_file(p) == entry.get("sha256")


def write_neox_checkpoint(
    out: Path,
    target: NeoXTarget,
    rank_shards: Callable[[SourceLayer, list[int]], Iterator[Shard]],
    *,
    source: dict[str, Any],
    recorded: dict[str, Any],
    planned_bytes: int,
    tokenizer: Path | None,
    guard: InterruptGuard,
    resume: bool = True,
    force: bool = False,
    quiet: bool = False,
    desc: str = "split",
) -> WriteReport:
    """Write the checkpoint. ``rank_shards(layer, ranks)`` yields that layer's shard for each of ``ranks``.

    Pipeline: one layer in memory (its full tensors, inside ``rank_shards``) plus one rank's shard.
    Sequential: each rank's file holds that rank's whole model, so ranks are written one after another and
    ``rank_shards`` is asked for every layer once per rank (memory: 1/T of the model plus one layer).
    """
    t0 = time.monotonic()
    out = Path(out)
    reusable = _prepare_out(out, source, recorded, resume=resume, force=force)
    step_dir = out / target.step_name
    step_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    _remove_stale(step_dir)
    free = shutil.disk_usage(out).free
    if planned_bytes > free:
        raise OutputError(f"{out}: needs about {planned_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free")
    (out / MANIFEST).unlink(missing_ok=True)
    state: dict[str, Any] = {"tool": "neoxconv", "kind": "neox", "version": __version__, "source": source,
                             "options": recorded, "files": {}}
    T = target.tp_degree
    rel = lambda name: f"{target.step_name}/{name}"  # noqa: E731
    written = reused = bytes_written = 0
    with progress_bar(total=planned_bytes, desc=desc, unit="B", quiet=quiet) as bar:
        if target.layout == "pipeline":
            for layer in target.layers:
                guard.check()
                names = [rel(pipeline_file_name(layer.index, r)) for r in range(T)]
                if all(_is_done(out, n, reusable.get(n)) for n in names):
                    state["files"].update({n: reusable[n] for n in names})
                    reused += T
                    continue
                bar.set_postfix_str(layer.label, refresh=False)
                for name, shard in zip(names, rank_shards(layer, list(range(T)))):
                    sha, size = save_pt(out / name, shard)
                    state["files"][name] = {"sha256": sha, "size": size}
                    written += 1
                    bytes_written += size
                    bar.update(shard_bytes(shard))
                    del shard  # before the next rank's part is made
                atomic_write_json(out / JOURNAL, state)
                guard.check()
            for r in range(T):
                name = rel(sequential_file_name(r))
                sha, size = save_pt(out / name, bookkeeping(target, None))
                state["files"][name] = {"sha256": sha, "size": size}
        else:
            for r in range(T):
                guard.check()
                name = rel(sequential_file_name(r))
                if _is_done(out, name, reusable.get(name)):
                    state["files"][name] = reusable[name]
                    reused += 1
                    continue
                module: Shard = {}
                for layer in target.layers:
                    bar.set_postfix_str(f"rank {r}, {layer.label}", refresh=False)
                    for shard in rank_shards(layer, [r]):
                        module.update({f"sequential.{layer.index}.{k}": v for k, v in shard.items()})
                        bar.update(shard_bytes(shard))
                    guard.check()
                sha, size = save_pt(out / name, bookkeeping(target, module))
                del module
                state["files"][name] = {"sha256": sha, "size": size}
                written += 1
                bytes_written += size
                atomic_write_json(out / JOURNAL, state)

    rows = target.config.vocab_size or 0
    divisor = vocab_divisor(rows, T, target.tokenizer_size)
    (out / "configs").mkdir(exist_ok=True)
    files = {f"configs/{CONFIG_NAME}": atomic_write(out / "configs" / CONFIG_NAME, neox_yaml(target, divisor).encode())}
    if tokenizer is not None:
        files[tokenizer.name] = atomic_write(out / tokenizer.name, tokenizer.read_bytes())
    files["latest"] = atomic_write(out / "latest", target.step_name.encode())
    for name, sha in files.items():
        state["files"][name] = {"sha256": sha, "size": (out / name).stat().st_size}
    state["config"] = dataclasses.asdict(target.config)
    state["make_vocab_size_divisible_by"] = divisor
    atomic_write_json(out / MANIFEST, state)
    (out / JOURNAL).unlink(missing_ok=True)
    _remove_stale(step_dir)
    total = sum(e["size"] for e in state["files"].values())
    row_bias = "rank0" if target.config.parallel_residual else "replicated"
    return WriteReport(out_dir=out, tp_degree=T, layout=target.layout, step=target.step, files_written=written,
                       files_reused=reused, total_bytes=total, make_vocab_size_divisible_by=divisor,
                       dtype=target.dtype, row_bias=row_bias, bytes_written=bytes_written,
                       seconds=time.monotonic() - t0)
