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
sha256 and the fingerprint of the source it was made from, so an interrupted run resumes and a changed source
is redone; the manifest ``neoxconv-neox.json`` is written last, and a no-op re-run never removes it. OUT is
locked for the whole run and only names `is_neox_output_name` accepts are ever deleted (`neoxconv.output.folder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neoxconv import __version__
from neoxconv.source.checkpoint import SourceLayer, model_layers, pipeline_file_name, sequential_file_name
from neoxconv.config import GELU_TANH, LLAMA, NeoXConfig, padded_vocab_size
from neoxconv.errors import ConfigError, OutputError
from neoxconv.interrupt import InterruptGuard
from neoxconv.output.folder import (OutputLock, foreign_entries, load_state, make_out_dir, remove_file,
                              remove_previous_output, remove_stale_temps)
from neoxconv.progress import progress_bar
from neoxconv.output.writer import TMP_SUFFIX, atomic_write, atomic_write_json, fsync_dir, output_error, sha256_file

JOURNAL = ".neoxconv-journal.json"
MANIFEST = "neoxconv-neox.json"
CONFIG_NAME = "neox.yml"
LAYOUTS = ("pipeline", "sequential")
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
    llama = c.architecture == LLAMA
    if llama:  # gpt-neox sizes a gated MLP as int(intermediate_size * 2/3) // 2 (mlp_multiple_of 1: as is)
        lines += [f'  "intermediate_size": {3 * c.ffn_size},  # linear1: 2 x {c.ffn_size} rows, linear2: {c.ffn_size}',
                  '  "mlp_multiple_of": 1,']
        if c.gqa:
            lines.append(f'  "num_kv_heads": {c.kv_heads},')
    elif c.ffn_size != 4 * c.hidden_size:
        lines.append(f'  "intermediate_size": {c.ffn_size},')
    lines += [
        f'  "seq-length": {c.max_position_embeddings},',
        f'  "max-position-embeddings": {c.max_position_embeddings},',
    ]
    if llama:
        lines += ['  "norm": "rmsnorm",', f'  "rms_norm_epsilon": {_yaml_float(c.layernorm_eps)},',
                  f'  "use_bias_in_attn_linear": {b(c.attention_bias)},', f'  "use_bias_in_mlp": {b(c.mlp_bias)},',
                  '  "use_bias_in_norms": false,']
    else:
        lines += ['  "norm": "layernorm",', f'  "layernorm-epsilon": {_yaml_float(c.layernorm_eps)},']
    lines += [
        '  "pos-emb": "rotary",',
        f'  "rotary_pct": {_yaml_float(c.rotary_pct)},',
        f'  "rotary_emb_base": {int(c.rotary_emb_base) if float(c.rotary_emb_base).is_integer() else _yaml_float(c.rotary_emb_base)},',
        '  "rotary_save_freqs_buffer": false,  # as gpt-neox saves Llama-style models: no inv_freq' if llama else
        '  "rotary_save_freqs_buffer": true,  # the block files carry attention.rotary_emb.inv_freq',
        f'  "no-weight-tying": {b(not c.tie_word_embeddings)},',
        f'  "gpt_j_residual": {b(c.parallel_residual)},',
        '  "output_layer_parallelism": "column",',
    ]
    if llama:
        lines += ['  "activation": "swiglu",', '  "bias-gelu-fusion": false,']
    else:
        lines += ['  "activation": "gelu",',
                  f'  "bias-gelu-fusion": {b(c.activation == GELU_TANH)},  # true: the tanh GELU (gelu_fast)']
    lines += [
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
        raise output_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return sha256_file(path), path.stat().st_size


def bookkeeping(target: NeoXTarget, module: Shard | None) -> dict[str, Any]:
    """What DeepSpeed and gpt-neox read from ``mp_rank_XX_model_states.pt`` (ints and None only)."""
    return {
        "module": module, "buffer_names": [], "global_steps": target.step, "global_samples": 0,
        "skipped_steps": 0, "iteration": target.step, "mp_world_size": target.tp_degree, "dp_world_size": 1,
    }


def shard_bytes(shard: Shard) -> int:
    return sum(t.numel() * t.element_size() for t in shard.values())


# ----- the output folder: what is ours ---------------------------------------------------------------------
FORMAT = 2  # the manifest format: 2 records each file's source fingerprint
_STEP_FILE = re.compile(r"^global_step\d+/(layer_\d{2,}-model_\d{2,}-model_states|mp_rank_\d{2,}_model_states)\.pt$")
_FIXED = frozenset({MANIFEST, JOURNAL, "latest", f"configs/{CONFIG_NAME}"})


def is_neox_output_name(rel: str) -> bool:
    """A path (relative to OUT) that `split` / `reshard` write: the rank files in ``global_step*/``,
    ``configs/neox.yml``, ``latest``, a ``*tokenizer.json`` copy, the manifest and the journal."""
    return rel in _FIXED or bool(_STEP_FILE.match(rel)) or ("/" not in rel and rel.endswith("tokenizer.json"))


def _check_folders(out: Path, step_name: str) -> None:
    """The folders neoxconv writes into are real folders inside OUT (or absent): never written through a link."""
    for name in (step_name, "configs"):
        p = out / name
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            what = "a symlink" if p.is_symlink() else "not a folder"
            raise OutputError(f"{p}: is {what}; neoxconv writes its own folder there: remove it or choose another OUT")


def _step_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("global_step*") if re.fullmatch(r"global_step\d+", p.name)
                  and p.is_dir() and not p.is_symlink())


def _remove_staging(folder: Path, *, ours: bool) -> None:
    """The hidden staging folder of `save_pt`: our files in it are removed only in an OUT that is ours; the
    folder itself only when empty."""
    staging = folder / STAGING
    if staging.is_symlink() or not staging.is_dir():
        return
    if ours:
        for p in staging.iterdir():
            if is_neox_output_name(f"{folder.name}/{p.name}") and p.is_file() and not p.is_symlink():
                remove_file(p)
    try:
        staging.rmdir()
    except OSError:
        pass


def _remove_stale(out: Path) -> None:
    """Temporaries of an interrupted run of ours (only called once OUT is known to be ours)."""
    remove_stale_temps(out, is_neox_output_name)
    remove_stale_temps(out, is_neox_output_name, "configs/")
    for step in _step_folders(out):
        remove_stale_temps(out, is_neox_output_name, f"{step}/")
        _remove_staging(out / step, ours=True)


def _remove_empty_folders(out: Path) -> None:
    for name in [*_step_folders(out), "configs"]:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            try:
                p.rmdir()  # only when empty
            except OSError:
                pass


def _prepare_out(out: Path, state: dict[str, Any] | None, source: dict, recorded: dict, *, step_name: str,
                 resume: bool, force: bool) -> dict[str, Any]:
    """Decide whether OUT is ours before deleting anything; return the finished files that may be kept.

    Called with OUT locked. A folder without our manifest or journal is someone else's: refused unless
    --force, and then nothing in it is deleted. In ours, only names `is_neox_output_name` accepts are removed:
    stale temporaries, and (--force over another source or options, or an output of an older format) the
    files its manifest lists.
    """
    if state is None:
        foreign = foreign_entries(out, is_neox_output_name)
        if foreign and not force:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputError(f"{out}: the folder is not empty ({shown}) and is not a neoxconv NeoX output; choose "
                              "an empty folder or pass --force (neoxconv only overwrites the files it writes)")
        _check_folders(out, step_name)
        return {}
    _check_folders(out, step_name)
    files = state.get("files") if isinstance(state.get("files"), dict) else {}
    same_source = (state.get("source") == source if state.get("format") == FORMAT
                   else _same_legacy_source(state.get("source"), source))
    same = same_source and state.get("options") == recorded
    if not same and files and not force:
        raise OutputError(f"{out}: holds a neoxconv output of another source or other options "
                          f"({state.get('options')}); choose another folder or pass --force to overwrite it")
    if not same:
        remove_previous_output(out, [*map(str, files), MANIFEST, JOURNAL], is_neox_output_name)
    _remove_stale(out)
    if not same:
        _remove_empty_folders(out)
    return dict(files) if same and resume else {}  # an older format's entries carry no fingerprint: all redone


def _same_legacy_source(recorded: Any, source: dict) -> bool:
    """An output of the format before per-file fingerprints: the same source folder (its files are redone)."""
    if not isinstance(recorded, dict):
        return False
    if "step_dir" in recorded:  # reshard
        return recorded.get("step_dir") == source.get("step_dir")
    files = recorded.get("files") if isinstance(recorded.get("files"), list) else []
    folders = {str(Path(str(f.get("path"))).parent) for f in files if isinstance(f, dict)}
    return bool(folders) and folders <= {source.get("hf_dir")}


def _is_done(out: Path, name: str, entry: Any, fingerprint: str) -> bool:
    """A finished file worth keeping: made from the same inputs, present, its recorded size and sha256."""
    p = out / name
    return (isinstance(entry, dict) and entry.get("source_fingerprint") == fingerprint and p.is_file()
            and not p.is_symlink() and p.stat().st_size == entry.get("size") and sha256_file(p) == entry.get("sha256"))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _is_same(out: Path, name: str, entry: Any, data: bytes) -> bool:
    """A small file (config, tokenizer, ``latest``) already holds ``data`` as recorded: not rewritten."""
    sha = hashlib.sha256(data).hexdigest()
    p = out / name
    return (isinstance(entry, dict) and entry.get("sha256") == sha and p.is_file() and not p.is_symlink()
            and sha256_file(p) == sha)


@dataclass
class _Group:
    """Files written together from the same source layers: a pipeline layer's rank files, or one mp_rank file."""

    names: list[str]
    layers: list[SourceLayer]
    fingerprint: str
    rank: int | None = None  # sequential: the rank; pipeline: None (all ranks of ``layers[0]``)
    bookkeeping: bool = False


def write_neox_checkpoint(
    out: Path,
    target: NeoXTarget,
    rank_shards: Callable[[SourceLayer, list[int]], Iterator[Shard]],
    *,
    source: dict[str, Any],
    recorded: dict[str, Any],
    fingerprint: Callable[[list[SourceLayer]], Any],
    planned_bytes: int,
    tokenizer: Path | None,
    guard: InterruptGuard,
    resume: bool = True,
    force: bool = False,
    quiet: bool = False,
    desc: str = "split",
) -> WriteReport:
    """Write the checkpoint. ``rank_shards(layer, ranks)`` yields that layer's shard for each of ``ranks``.

    ``source`` says which source this is (a different one is refused without --force); ``fingerprint(layers)``
    is the proof of what those source layers hold (JSON-able), recorded with each file: a resumed run keeps a
    file only when its fingerprint is unchanged and its bytes hash as recorded.

    Pipeline: one layer in memory (its full tensors, inside ``rank_shards``) plus one rank's shard.
    Sequential: each rank's file holds that rank's whole model, so ranks are written one after another and
    ``rank_shards`` is asked for every layer once per rank (memory: 1/T of the model plus one layer).
    OUT is locked (`OutputLock`) for the whole run.
    """
    out = Path(out)
    make_out_dir(out)
    with OutputLock(out, command=desc):
        return _write(out, target, rank_shards, source=source, recorded=recorded, fingerprint=fingerprint,
                      planned_bytes=planned_bytes, tokenizer=tokenizer, guard=guard, resume=resume, force=force,
                      quiet=quiet, desc=desc)


def _write(out: Path, target: NeoXTarget, rank_shards: Callable[[SourceLayer, list[int]], Iterator[Shard]], *,
           source: dict[str, Any], recorded: dict[str, Any], fingerprint: Callable[[list[SourceLayer]], Any],
           planned_bytes: int, tokenizer: Path | None, guard: InterruptGuard, resume: bool, force: bool,
           quiet: bool, desc: str) -> WriteReport:
    t0 = time.monotonic()
    previous = load_state(out, (JOURNAL, MANIFEST), kind="neox")
    reusable = _prepare_out(out, previous, source, recorded, step_name=target.step_name, resume=resume, force=force)
    step_dir = out / target.step_name
    T = target.tp_degree
    rel = lambda name: f"{target.step_name}/{name}"  # noqa: E731
    groups: list[_Group] = []
    if target.layout == "pipeline":
        for layer in target.layers:
            groups.append(_Group([rel(pipeline_file_name(layer.index, r)) for r in range(T)], [layer],
                                 _digest(fingerprint([layer]))))
        groups.append(_Group([rel(sequential_file_name(r)) for r in range(T)], [], _digest(fingerprint([])),
                             bookkeeping=True))
    else:
        whole = _digest(fingerprint(target.layers))
        groups += [_Group([rel(sequential_file_name(r))], target.layers, whole, rank=r) for r in range(T)]

    # which files are kept (same inputs, sha256 as recorded), what else changes: decided before writing
    state: dict[str, Any] = {"tool": "neoxconv", "kind": "neox", "format": FORMAT, "version": __version__,
                             "source": source, "options": recorded, "files": {}}
    todo: list[_Group] = []
    reused = 0
    for g in groups:
        guard.check()
        if all(_is_done(out, n, reusable.get(n), g.fingerprint) for n in g.names):
            state["files"].update({n: reusable[n] for n in g.names})
            reused += len(g.names) if not g.bookkeeping else 0
        else:
            todo.append(g)
    rows = target.config.vocab_size or 0
    divisor = vocab_divisor(rows, T, target.tokenizer_size)
    small = {f"configs/{CONFIG_NAME}": neox_yaml(target, divisor).encode()}
    if tokenizer is not None:
        small[tokenizer.name] = tokenizer.read_bytes()
    small["latest"] = target.step_name.encode()
    small_todo = {n for n, data in small.items() if not _is_same(out, n, reusable.get(n), data)}
    state["files"].update({n: reusable[n] for n in small if n not in small_todo})  # the journal keeps them too
    if todo or small_todo:  # a file is about to change: the manifest only exists beside a complete output
        remove_file(out / MANIFEST)
    # a no-op re-run changes no file and keeps the old manifest until the new one replaces it (a Ctrl-C never
    # leaves none)
    if todo:
        free = shutil.disk_usage(out).free
        if planned_bytes > free:
            raise OutputError(f"{out}: needs about {planned_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free")
    atomic_write_json(out / JOURNAL, state)
    step_dir.mkdir(exist_ok=True)
    written = bytes_written = 0

    def record(name: str, sha: str, size: int, g: _Group) -> None:
        state["files"][name] = {"sha256": sha, "size": size, "source_fingerprint": g.fingerprint}

    with progress_bar(total=planned_bytes, desc=desc, unit="B", quiet=quiet or not todo) as bar:
        for g in todo:
            guard.check()
            if g.bookkeeping:
                for name in g.names:
                    record(name, *save_pt(out / name, bookkeeping(target, None)), g)
            elif g.rank is None:
                layer = g.layers[0]
                bar.set_postfix_str(layer.label, refresh=False)
                for name, shard in zip(g.names, rank_shards(layer, list(range(T)))):
                    sha, size = save_pt(out / name, shard)
                    record(name, sha, size, g)
                    written += 1
                    bytes_written += size
                    bar.update(shard_bytes(shard))
                    del shard  # before the next rank's part is made
            else:
                module: Shard = {}
                for layer in g.layers:
                    bar.set_postfix_str(f"rank {g.rank}, {layer.label}", refresh=False)
                    for shard in rank_shards(layer, [g.rank]):
                        module.update({f"sequential.{layer.index}.{k}": v for k, v in shard.items()})
                        bar.update(shard_bytes(shard))
                    guard.check()
                sha, size = save_pt(out / g.names[0], bookkeeping(target, module))
                del module
                record(g.names[0], sha, size, g)
                written += 1
                bytes_written += size
            atomic_write_json(out / JOURNAL, state)
            guard.check()
    state["files"] = {n: state["files"][n] for g in groups for n in g.names}  # in order; small files below

    (out / "configs").mkdir(exist_ok=True)
    for name, data in small.items():
        sha = atomic_write(out / name, data) if name in small_todo else hashlib.sha256(data).hexdigest()
        state["files"][name] = {"sha256": sha, "size": len(data)}
    state["config"] = dataclasses.asdict(target.config)
    state["make_vocab_size_divisible_by"] = divisor
    atomic_write_json(out / MANIFEST, state)
    remove_file(out / JOURNAL)
    _remove_staging(step_dir, ours=False)
    total = sum(e["size"] for e in state["files"].values())
    row_bias = "rank0" if target.config.parallel_residual else "replicated"
    return WriteReport(out_dir=out, tp_degree=T, layout=target.layout, step=target.step, files_written=written,
                       files_reused=reused, total_bytes=total, make_vocab_size_divisible_by=divisor,
                       dtype=target.dtype, row_bias=row_bias, bytes_written=bytes_written,
                       seconds=time.monotonic() - t0)
