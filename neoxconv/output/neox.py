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

OUT follows the one output-folder protocol (`neoxconv.output.folder`): locked for the whole run, every file
written to a hidden temporary (O_EXCL|O_NOFOLLOW), hashed while written (BLAKE3 by default), fsynced and
renamed; the journal records every finished file with its hash and the fingerprint of the source it was made
from, so an interrupted run resumes and a changed source is redone; the manifest ``neoxconv.json`` is written
last (``neoxconv-neox.json`` of the previous version is still read), and a no-op re-run never removes it.
Only names `is_neox_output_name` accepts are ever deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neoxconv.source.checkpoint import SourceLayer, model_layers, pipeline_file_name, sequential_file_name
from neoxconv.config import GELU_TANH, LLAMA, NeoXConfig, padded_vocab_size
from neoxconv.errors import ConfigError
from neoxconv.interrupt import InterruptGuard
from neoxconv.output.finite import count_tensor_nonfinite, report_nonfinite
from neoxconv.output.folder import NEOX, FileEntry, FolderSpec, OutputFolder, remove_file
from neoxconv.output.hashing import DEFAULT_HASH, hash_file
from neoxconv.output.writer import TMP_SUFFIX, fsync_dir, output_error
from neoxconv.progress import progress_bar, recheck_bar

CONFIG_NAME = "neox.yml"
TOKENIZER_NAME = "tokenizer.json"  # whatever the source's tokenizer file is called
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
                          + " (choose a --tp that divides them)")


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
PRIVATE_PREFIX = ".neoxconv-pt-"  # save_pt's private folders: .neoxconv-pt-XXXXXXXX.neoxconv-tmp
LEGACY_STAGING = ".staging" + TMP_SUFFIX  # where the previous version's save_pt wrote; its leftovers are cleaned


def save_pt(path: Path, obj: Any, *, hash_algo: str = DEFAULT_HASH) -> tuple[str, int]:
    """``torch.save`` atomically; returns (hex digest, size).

    torch names the records inside the archive after the file it is given (``layer_02-model_00-model_states/``;
    a file object would give ``archive/``), so it is given a path with the final name, inside a private
    folder that `tempfile.mkdtemp` creates afresh beside ``path`` (mode 0700, a new random name: no link or
    file planted in OUT is ever opened or followed). The file is fsynced, hashed, and renamed into place.

    The hash is the one place a writer reads back what it wrote: torch's writer holds the GIL while it writes
    a storage, so its bytes cannot be hashed on their way out without changing the archive's record names.
    A streaming archive writer that hands its bytes to `open_atomic` (hashed while written) replaces this.
    """
    try:
        private = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, suffix=TMP_SUFFIX, dir=path.parent))
    except OSError as e:
        raise output_error(path, e) from None
    tmp = private / path.name
    try:
        torch.save(obj, tmp)
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        digest = hash_file(tmp, hash_algo)
        os.replace(tmp, path)
    except OSError as e:
        raise output_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
        private.rmdir()
    fsync_dir(path.parent)
    return digest, size


def bookkeeping(target: NeoXTarget, module: Shard | None) -> dict[str, Any]:
    """What DeepSpeed and gpt-neox read from ``mp_rank_XX_model_states.pt`` (ints and None only)."""
    return {
        "module": module, "buffer_names": [], "global_steps": target.step, "global_samples": 0,
        "skipped_steps": 0, "iteration": target.step, "mp_world_size": target.tp_degree, "dp_world_size": 1,
    }


def shard_bytes(shard: Shard) -> int:
    return sum(t.numel() * t.element_size() for t in shard.values())


def _tensor_bytes(path: Path) -> int:
    """The tensor bytes of a rank file this run keeps (its zip's data records; the file was just proven ours by
    its hash): what writing it would have added to the progress bar (`shard_bytes` of its shards)."""
    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist() if "/data/" in i.filename)


# ----- the output folder: what is ours ---------------------------------------------------------------------
_STEP_FILE = re.compile(r"^global_step\d+/(layer_\d{2,}-model_\d{2,}-model_states|mp_rank_\d{2,}_model_states)\.pt$")
_FIXED = frozenset({"latest", f"configs/{CONFIG_NAME}"})


def is_neox_output_name(rel: str) -> bool:
    """A path (relative to OUT) that `split` / `reshard` write: the rank files in ``global_step*/``,
    ``configs/neox.yml``, ``latest``, the tokenizer (``*tokenizer.json``: earlier versions kept the source's
    name), the manifest and the journal (`OutputFolder` adds those)."""
    return rel in _FIXED or bool(_STEP_FILE.match(rel)) or ("/" not in rel and rel.endswith("tokenizer.json"))


def _step_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("global_step*") if re.fullmatch(r"global_step\d+", p.name)
                  and p.is_dir() and not p.is_symlink())


def _remove_private_folders(out: Path) -> None:
    """`save_pt`'s private folders left by a killed run (and the previous version's ``.staging.neoxconv-tmp``),
    in an OUT that is ours: our files in them are removed, a folder only when then empty; a link under such a
    name is never followed."""
    for step in _step_folders(out):
        for folder in sorted((out / step).iterdir()):
            private = folder.name.startswith(PRIVATE_PREFIX) and folder.name.endswith(TMP_SUFFIX)
            if not (private or folder.name == LEGACY_STAGING) or folder.is_symlink() or not folder.is_dir():
                continue
            for p in folder.iterdir():
                if is_neox_output_name(f"{step}/{p.name}") and p.is_file() and not p.is_symlink():
                    remove_file(p)
            try:
                folder.rmdir()
            except OSError:
                pass


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    allow_nonfinite: bool = False,
    hash_algo: str = DEFAULT_HASH,
    desc: str = "split",
) -> WriteReport:
    """Write the checkpoint. ``rank_shards(layer, ranks)`` yields that layer's shard for each of ``ranks``.

    ``source`` says which source this is (a different one is refused without --force); ``fingerprint(layers)``
    is the proof of what those source layers hold (JSON-able), recorded with each file: a resumed run keeps a
    file only when its fingerprint is unchanged, its bytes hash as recorded, and (inf/nan in it) this run allows
    non-finite values. Every tensor is checked for inf/nan before it is written (`report_nonfinite`).

    Pipeline: one layer in memory (its full tensors, inside ``rank_shards``) plus one rank's shard.
    Sequential: each rank's file holds that rank's whole model, so ranks are written one after another and
    ``rank_shards`` is asked for every layer once per rank (memory: 1/T of the model plus one layer).
    OUT is held through `OutputFolder` (locked) for the whole run.
    """
    t0 = time.monotonic()
    out = Path(out)
    T = target.tp_degree
    spec = FolderSpec(kind=NEOX, command=desc, is_ours=is_neox_output_name, noun="NeoX output",
                      folders=(target.step_name, "configs"), stale_folders=_step_folders)
    rel = lambda name: f"{target.step_name}/{name}"
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
    rows = target.config.vocab_size or 0
    divisor = vocab_divisor(rows, T, target.tokenizer_size)
    small = {f"configs/{CONFIG_NAME}": neox_yaml(target, divisor).encode()}
    if tokenizer is not None:
        small[TOKENIZER_NAME] = tokenizer.read_bytes()
    small["latest"] = target.step_name.encode()
    allowed = lambda e: allow_nonfinite or not e.nonfinite

    with OutputFolder(out, spec, source=source, options=recorded, hash_algo=hash_algo, resume=resume,
                      force=force) as folder:
        if folder.ours:
            _remove_private_folders(out)
        # which files are kept (same inputs, allowed, hash as recorded), what else changes: decided before writing
        todo: list[_Group] = []
        reused = kept_bytes = 0
        with recheck_bar(sum(folder.resumable_bytes(n, g.fingerprint) for g in groups for n in g.names),
                         quiet=quiet) as bar:
            for g in groups:
                guard.check()
                kept = {n: folder.reusable(n, g.fingerprint, allowed) for n in g.names}
                bar.update(sum(folder.resumable_bytes(n, g.fingerprint) for n in g.names))
                if all(e is not None for e in kept.values()):
                    folder.keep(kept)
                    reused += len(g.names) if not g.bookkeeping else 0
                    kept_bytes += sum(_tensor_bytes(out / n) for n in g.names)
                else:
                    todo.append(g)
        folder.begin([n for g in groups for n in g.names], small, planned_bytes if todo else 0)
        written = bytes_written = 0

        def save(name: str, obj: Any, g: _Group, warnings: list[str], nonfinite: int) -> int:
            digest, size = save_pt(folder.path(name), obj, hash_algo=folder.hash)
            folder.record({name: FileEntry(size=size, algo=folder.hash, digest=digest, fingerprint=g.fingerprint,
                                           nonfinite=nonfinite, warnings=warnings)})
            return size

        def checked(shard: Shard, where: str, warnings: list[str]) -> int:
            n = 0
            for key, t in shard.items():
                k = count_tensor_nonfinite(t, target.dtype)
                report_nonfinite(k, f"{where}: {key!r}", target.dtype, allow=allow_nonfinite, warnings=warnings,
                                 doing="splitting" if desc == "split" else "resharding")
                n += k
            return n

        # the bar counts tensor bytes as they are written: of a resumed run, only what is left (it ends at 100%)
        with progress_bar(total=max(planned_bytes - kept_bytes, 0), desc=desc, unit="B",
                          quiet=quiet or not todo) as bar:
            for g in todo:
                guard.check()
                if g.bookkeeping:
                    for name in g.names:
                        save(name, bookkeeping(target, None), g, [], 0)
                elif g.rank is None:
                    layer = g.layers[0]
                    bar.set_postfix_str(layer.label, refresh=False)
                    for r, (name, shard) in enumerate(zip(g.names, rank_shards(layer, list(range(T))))):
                        warnings: list[str] = []
                        n = checked(shard, f"{layer.label} (rank {r})", warnings)
                        size = save(name, shard, g, warnings, n)
                        written += 1
                        bytes_written += size
                        bar.update(shard_bytes(shard))
                        del shard  # before the next rank's part is made
                else:
                    module: Shard = {}
                    warnings = []
                    n = 0
                    for layer in g.layers:
                        bar.set_postfix_str(f"rank {g.rank}, {layer.label}", refresh=False)
                        for shard in rank_shards(layer, [g.rank]):
                            n += checked(shard, f"{layer.label} (rank {g.rank})", warnings)
                            module.update({f"sequential.{layer.index}.{k}": v for k, v in shard.items()})
                            bar.update(shard_bytes(shard))
                        guard.check()
                    size = save(g.names[0], bookkeeping(target, module), g, warnings, n)
                    del module
                    written += 1
                    bytes_written += size
                guard.check()
        state = folder.finish({"config": dataclasses.asdict(target.config),
                               "make_vocab_size_divisible_by": divisor})
    entries = state.entries.values()
    row_bias = "rank0" if target.config.parallel_residual else "replicated"
    return WriteReport(out_dir=out, tp_degree=T, layout=target.layout, step=target.step, files_written=written,
                       files_reused=reused, total_bytes=sum(e.size for e in entries),
                       make_vocab_size_divisible_by=divisor, dtype=target.dtype, row_bias=row_bias,
                       bytes_written=bytes_written, seconds=time.monotonic() - t0,
                       warnings=[w for e in entries for w in e.warnings])
