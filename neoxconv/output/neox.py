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

Every file is what ``torch.save`` writes for the same object, byte for byte, written without torch by
`neoxconv.output.ptarchive` while the tensors stream from the source in row blocks (`PtFiles`).

OUT follows the one output-folder protocol (`neoxconv.output.folder`): locked for the whole run, every file
written to a hidden temporary (O_EXCL|O_NOFOLLOW), hashed while written (BLAKE3 by default), fsynced and
renamed; the journal records every finished file with its hash and the fingerprint of the source it was made
from, so an interrupted run resumes and a changed source is redone; the manifest ``neoxconv.json`` is written
last (``neoxconv-neox.json`` of the previous version is still read), and a no-op re-run never removes it.
Only names `is_neox_output_name` accepts are ever deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from neoxconv.config import GELU_TANH, LLAMA, NeoXConfig, padded_vocab_size
from neoxconv.dtypes import NonFiniteCounter, tensor_nbytes
from neoxconv.errors import CheckpointError, ConfigError
from neoxconv.interrupt import InterruptGuard
from neoxconv.merge import LLAMA_W123_KEYS
from neoxconv.output.finite import report_nonfinite
from neoxconv.output.folder import NEOX, FileEntry, FolderSpec, OutputFolder
from neoxconv.output.hashing import DEFAULT_HASH
from neoxconv.output.ptarchive import PtArchiveWriter, TensorSpec, archive_name_for, plan_archive
from neoxconv.output.writer import TMP_SUFFIX, OutFile, open_atomic
from neoxconv.progress import progress_bar, recheck_bar
from neoxconv.smallfile import read_small_bytes
from neoxconv.source.checkpoint import SourceLayer, model_layers, pipeline_file_name, sequential_file_name
from neoxconv.source.tokenizer import TOKENIZER_MAX_BYTES

CONFIG_NAME = "neox.yml"
TOKENIZER_NAME = "tokenizer.json"  # whatever the source's tokenizer file is called
LAYOUTS = ("pipeline", "sequential")
_PRECISION = {"float16": "fp16", "bfloat16": "bfloat16", "float32": "fp32"}

@dataclass(frozen=True)
class NeoXTarget:
    """What to write: the model, the TP degree, the layout, the dtype and the step."""

    config: NeoXConfig
    tp_degree: int
    layout: str = "pipeline"
    dtype: str = "float16"
    step: int = 0
    tokenizer_size: int | None = None  # entries in the tokenizer, when known (for the vocab padding rule)
    generation: str | None = None  # the MLP key generation written (`merge.key_table`; None: the table's first)
    rotary_buffers: bool = False  # the block files carry attention.rotary_emb.inv_freq (rotary_save_freqs_buffer)

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


def output_layout(config: NeoXConfig, requested: str | None, *, source_layout: str | None = None) -> str:
    """The layout written when ``--layout`` is ``requested`` (None: the source's, else pipeline). A reward model
    defaults to the sequential layout: gpt-neox trains ``train_impl: rm`` with pipe-parallel-size 0 only
    (megatron/training.py ``get_batch_pipe`` asserts it), i.e. from the ``mp_rank_XX`` files' ``module``."""
    if requested is not None:
        return requested
    if config.reward_model:
        return "sequential"
    return source_layout or "pipeline"


def check_target(target: NeoXTarget, *, where: str) -> None:
    """Every reason the model cannot be written at this TP degree / layout, as one ConfigError (exit 3)."""
    if target.tp_degree < 1:
        raise ConfigError(f"--tp must be at least 1, got {target.tp_degree}")
    if target.layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {target.layout!r}")
    if target.config.reward_model and target.layout == "pipeline":
        raise ConfigError(f"{where}: a reward model (train_impl rm) is written in the sequential layout only: "
                          "gpt-neox trains reward models with pipe-parallel-size 0 (its get_batch_pipe refuses rm), "
                          "which loads the mp_rank files; use --layout sequential (the default for reward models)")
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
    ]
    if c.reward_model:  # what else an rm run needs is data (pairwise) and the tokenizer's pad token, not model keys
        pad = "unknown" if c.pad_token_id is None else f"id {c.pad_token_id}"
        lines += [
            "# A reward model (train_impl rm): rm_linear [1, hidden], row-parallel, instead of final_linear. gpt-neox",
            "# trains it with pipe-parallel-size 0 (as written below) and 'dataset_impl: pairwise' (pos/neg data).",
            f"# Pad token: {pad} (gpt-neox pads with its tokenizer's <|padding|>); merge back with --pad-token-id.",
        ]
    lines += [
        "{",
        f'  "pipe-parallel-size": {1 if target.layout == "pipeline" else 0},',
        f'  "model-parallel-size": {target.tp_degree},',
        "",
        f'  "num-layers": {c.num_layers},',
        f'  "hidden-size": {c.hidden_size},',
        f'  "num-attention-heads": {c.num_heads},',
    ]
    llama = c.architecture == LLAMA
    w123 = target.generation == LLAMA_W123_KEYS  # gpt-neox 2023-05 .. 2024-09: LLaMAParallelMLP, sized as is
    if w123:
        lines += ['  "mlp_type": "llama",', f'  "intermediate_size": {c.ffn_size},']
        if c.gqa:
            lines.append(f'  "num_kv_heads": {c.kv_heads},')
    elif llama:  # gpt-neox sizes a gated MLP as int(intermediate_size * 2/3) // 2 (mlp_multiple_of 1: as is)
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
    if c.sliding_window is not None:  # Mistral: a query sees itself and the W keys before it (get_attn_mask)
        lines.append(f'  "sliding_window_width": {c.sliding_window},')
    if llama:
        lines += ['  "norm": "rmsnorm",', f'  "rms_norm_epsilon": {_yaml_float(c.layernorm_eps)},',
                  f'  "use_bias_in_attn_linear": {b(c.attention_bias)},', '  "use_bias_in_norms": false,']
        if not w123:  # (LLaMAParallelMLP has no biases, and its gpt-neox has no such setting)
            lines.append(f'  "use_bias_in_mlp": {b(c.mlp_bias)},')
    else:
        lines += ['  "norm": "layernorm",', f'  "layernorm-epsilon": {_yaml_float(c.layernorm_eps)},']
    lines += [
        '  "pos-emb": "rotary",',
        f'  "rotary_pct": {_yaml_float(c.rotary_pct)},',
        f'  "rotary_emb_base": '
        f'{int(c.rotary_emb_base) if float(c.rotary_emb_base).is_integer() else _yaml_float(c.rotary_emb_base)},',
        '  "rotary_save_freqs_buffer": true,  # the block files carry attention.rotary_emb.inv_freq'
        if target.rotary_buffers else '  "rotary_save_freqs_buffer": false,  # no inv_freq in the block files',
        f'  "no-weight-tying": {b(not c.tie_word_embeddings)},',
        f'  "gpt_j_residual": {b(c.parallel_residual)},',
        '  "output_layer_parallelism": "column",',
    ]
    if w123:
        lines += ['  "activation": "silu",', '  "bias-gelu-fusion": false,']
    elif llama:
        lines += ['  "activation": "swiglu",', '  "bias-gelu-fusion": false,']
    else:
        lines += ['  "activation": "gelu",',
                  f'  "bias-gelu-fusion": {b(c.activation == GELU_TANH)},  # true: the tanh GELU (gelu_fast)']
    if c.reward_model:  # ParallelLinear then ignores output_layer_parallelism: rm_linear is row-parallel
        lines.append('  "train_impl": "rm",')
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
PRIVATE_PREFIX = ".neoxconv-pt-"  # the previous version's private folders (.neoxconv-pt-XXXXXXXX.neoxconv-tmp)
LEGACY_STAGING = ".staging" + TMP_SUFFIX  # where an older version wrote; leftovers of both are cleaned


@dataclass(frozen=True)
class ShardTensor:
    """One tensor of a rank file: its key as written, its dtype and each rank's shape (even splits: the same
    on every rank)."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


class Emit(Protocol):
    """Where a layer's shards go. ``emit(rank, index, block)``: the next bytes (a C-contiguous numpy block) of
    tensor ``index`` of the layer being streamed, for ``rank``; ``emit.fill(rank, index, nbytes, fill, unit)``:
    the next ``nbytes`` of it, filled by ``fill(view)`` straight into the output's staging buffer (consecutive
    views of whole ``unit``s: read the source into them, no copy). Each rank's tensors arrive in order, each
    whole before the next begins."""

    def __call__(self, rank: int, index: int, block: np.ndarray) -> None: ...

    def fill(self, rank: int, index: int, nbytes: int, fill: Callable[[memoryview], None], unit: int) -> None: ...


@dataclass(frozen=True)
class LayerStream:
    """How a writer gets the shards of its layers: ``tensors(layer)`` lists each rank's tensors in file order
    (metadata only); ``stream(layer, emit)`` streams every rank's bytes, each source byte read once;
    ``confirmed(layers)`` is True once every source byte streamed for ``layers`` has passed its check (a
    storage shared by later layers is checked with the last of them: their files enter the journal then);
    ``settle()`` checks whatever is left (a resumed run may skip the layer that was to check a storage)."""

    tensors: Callable[[SourceLayer], list[ShardTensor]]
    stream: Callable[[SourceLayer, Emit], None]
    confirmed: Callable[[list[SourceLayer]], bool] = lambda layers: True
    settle: Callable[[], None] = lambda: None


class _RankSink:
    """The `Emit` of one layer: each block or filled view is counted for inf/nan in its tensor's dtype while in
    the CPU cache, written to its rank's file (`PtFiles`), and shown on the progress bar."""

    def __init__(self, files: PtFiles, slot: dict[int, int], tensors: list[ShardTensor], counts: list[list[int]],
                 bar: Any, guard: Any) -> None:
        self._files, self._slot, self._tensors, self._counts = files, slot, tensors, counts
        self._bar, self._guard = bar, guard
        # one scratch buffer per dtype (a kept buffer may not have the weights' dtype)
        self._counters = {t.dtype: NonFiniteCounter(t.dtype) for t in tensors}

    def _counted(self, i: int, index: int, data) -> None:
        counter = self._counters[self._tensors[index].dtype]
        counter.count = 0
        counter.update(data)
        self._counts[i][index] += counter.count

    def __call__(self, rank: int, index: int, block: np.ndarray) -> None:
        i = self._slot.get(rank)
        if i is None:  # a rank whose file is kept
            return
        if block.ndim > 1 and not block.flags.c_contiguous and block.nbytes:
            # a rank's columns of a row block: copied once, whole rows at a time, into the staging buffer
            rows, done = block.reshape(block.shape[0], -1), [0]

            def copy(view: memoryview) -> None:
                n = len(view) // rows[0].nbytes
                np.frombuffer(view, dtype=block.dtype).reshape(n, -1)[:] = rows[done[0]:done[0] + n]
                done[0] += n

            self.fill(rank, index, block.nbytes, copy, rows[0].nbytes)
            return
        self._counted(i, index, block)
        self._files.write(i, block)
        self._bar.update(block.nbytes)
        self._guard.check()

    def fill(self, rank: int, index: int, nbytes: int, fill: Callable[[memoryview], None], unit: int) -> None:
        i = self._slot.get(rank)
        if i is None:  # a rank whose file is kept: nothing read for it
            return

        def filled(view: memoryview) -> None:
            fill(view)
            self._counted(i, index, view)
            self._bar.update(len(view))
            self._guard.check()

        self._files.fill(i, nbytes, filled, unit=unit)


def save_pt(where: Path | OutFile, obj: Any, *, hash_algo: str = DEFAULT_HASH) -> tuple[str, int]:
    """Write a small archive without tensors (the bookkeeping files) as ``torch.save(obj, path)`` writes it,
    atomically; returns (hex digest, size)."""
    with PtFiles([where], [obj], hash_algo=hash_algo) as files:
        pass
    return files.digests[0], files.sizes[0]


class PtFiles:
    """Write several ``torch.save`` archives side by side, their storages streamed in blocks (`PtArchiveWriter`).

    ``objs[i]`` is the object saved to ``targets[i]`` (an `OutFile`, or a path) with every tensor a `TensorSpec`;
    ``write(i, block)`` appends the next bytes of file i's current storage. Each file is written through the
    merge's staged O_DIRECT path (`open_atomic(..., staged=True)`): a hidden temporary (O_EXCL|O_NOFOLLOW),
    hashed while written, CRC-32s computed while the bytes are in cache, fsynced and renamed when the ``with``
    block ends without an error; an error (or Ctrl-C) leaves no file. The archives are named as torch names them
    after their final file name. Memory: the staging buffers, whatever the tensor sizes.
    """

    def __init__(self, targets: list[Path | OutFile], objs: list[Any], *, hash_algo: str = DEFAULT_HASH) -> None:
        self.targets = list(targets)
        self.paths = [t.path if isinstance(t, OutFile) else Path(t) for t in self.targets]
        self.layouts = [plan_archive(o, archive_name=archive_name_for(p)) for p, o in zip(self.paths, objs)]
        self.hash_algo = hash_algo
        self._stack = contextlib.ExitStack()
        self._files: list[Any] = []
        self._writers: list[PtArchiveWriter] = []
        self._storage = [0] * len(self.paths)  # each file's storage being written
        self._left = [0] * len(self.paths)  # bytes still due in it
        self.digests: list[str] = []
        self.sizes: list[int] = []

    def __enter__(self) -> PtFiles:
        try:
            for target, layout in zip(self.targets, self.layouts):
                f = self._stack.enter_context(open_atomic(target, hash_algo=self.hash_algo, staged=True))
                self._files.append(f)
                self._writers.append(PtArchiveWriter(f.write, layout, fill=f.fill))
            self._left = [lay.tensors[0].nbytes if lay.tensors else 0 for lay in self.layouts]
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, i: int, block: np.ndarray) -> None:
        """The next bytes of file ``i``'s current storage (it moves on to the next storage once complete)."""
        self._advance(i)
        data = memoryview(np.ascontiguousarray(block)).cast("B")
        self._writers[i].write(self._storage[i], data)
        self._left[i] -= len(data)

    def fill(self, i: int, nbytes: int, fill: Callable[[memoryview], None], *, unit: int = 1) -> None:
        """The next ``nbytes`` of file ``i``'s current storage, filled by ``fill(view)`` in the file's staging
        buffer itself (`_AtomicFile.fill`: consecutive views of whole ``unit``s)."""
        self._advance(i)
        self._writers[i].fill(self._storage[i], nbytes, fill, unit=unit)
        self._left[i] -= nbytes

    def _advance(self, i: int) -> None:
        while not self._left[i] and self._storage[i] + 1 < len(self.layouts[i].tensors):
            self._storage[i] += 1
            self._left[i] = self.layouts[i].tensors[self._storage[i]].nbytes

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                for w in self._writers:
                    w.finish()
            except BaseException:
                self._stack.__exit__(*sys.exc_info())
                raise
        self._stack.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.digests = [f.hexdigest() for f in self._files]
            self.sizes = [f.size for f in self._files]


def bookkeeping(target: NeoXTarget, module: dict[str, TensorSpec] | None) -> dict[str, Any]:
    """What DeepSpeed and gpt-neox read from ``mp_rank_XX_model_states.pt`` (ints and None only)."""
    return {
        "module": module, "buffer_names": [], "global_steps": target.step, "global_samples": 0,
        "skipped_steps": 0, "iteration": target.step, "mp_world_size": target.tp_degree, "dp_world_size": 1,
    }


def _tensor_bytes(folder: OutputFolder, rel: str) -> int:
    """The tensor bytes of a rank file this run keeps (its zip's data records; the file was just proven ours by
    its hash): what writing it would have added to the progress bar."""
    f = folder.dirs.open_read(rel)
    if f is None:
        return 0
    with f, zipfile.ZipFile(f) as z:
        return sum(i.file_size for i in z.infolist() if "/data/" in i.filename)


# ----- a dry run: the files, their bytes and the free disk, nothing written ------------------------------------
@dataclass
class NeoXOutputPlan:
    """What `split` / `reshard` would write into OUT (``--dry-run``): every file with its exact size (the
    archives' layouts are decided by names, dtypes and shapes alone), the free disk there, and whether OUT is
    usable (as ``inspect --out`` tells for merge)."""

    out_dir: Path
    tp_degree: int
    layout: str
    step: int
    dtype: str
    key_generation: str | None
    files: list[tuple[str, int]]  # (path relative to OUT, bytes), in the order they would be written
    out_free_bytes: int
    out_free_bytes_at: str
    out_problem: str | None
    train_impl: str = "normal"  # gpt-neox's train_impl the config says: rm for a reward model (rm_linear readout)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def fits(self) -> bool:
        return self.out_problem is None and self.out_free_bytes >= self.total_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": True, "out": str(self.out_dir), "tp_degree": self.tp_degree, "layout": self.layout,
                "step": self.step, "dtype": self.dtype, "key_generation": self.key_generation,
                "train_impl": self.train_impl, "files": [{"name": n, "bytes": b} for n, b in self.files],
                "total_bytes": self.total_bytes,
                "out_free_bytes": self.out_free_bytes, "out_free_bytes_at": self.out_free_bytes_at,
                "out_problem": self.out_problem, "out_fits": self.fits}

    def summary(self) -> str:
        """For people: one line per file, then the totals."""
        lines = [f"{size:>16,}  {name}" for name, size in self.files]
        free = f"{self.out_free_bytes:,} bytes free at {self.out_free_bytes_at}"
        verdict = (f"OUT UNUSABLE: {self.out_problem}" if self.out_problem else
                   "fits" if self.fits else "NOT ENOUGH free space")
        model = ", reward model (train_impl rm)" if self.train_impl == "rm" else ""
        lines.append(f"dry run: TP={self.tp_degree} ({self.layout}, {self.step_name}, {self.dtype}{model}) -> "
                     f"{self.out_dir}: "
                     f"{len(self.files)} file(s), {self.total_bytes:,} bytes; {free}; {verdict}; nothing written")
        return "\n".join(lines)

    @property
    def step_name(self) -> str:
        return f"global_step{self.step}"


def plan_neox_output(out: Path, target: NeoXTarget, tensors: Callable[[SourceLayer], list[ShardTensor]], *,
                     tokenizer: Path | None) -> NeoXOutputPlan:
    """The files `write_neox_checkpoint` would write for ``target`` (from ``tensors``, metadata only) with their
    exact sizes, and the free disk at OUT; nothing is read or written."""
    from neoxconv.output.describe import free_bytes, out_problem

    T = target.tp_degree
    rel = lambda name: f"{target.step_name}/{name}"  # noqa: E731
    spec = lambda ts: {t.key: TensorSpec(t.dtype, t.shape) for t in ts}  # noqa: E731
    objs: list[tuple[str, Any]] = []
    if target.layout == "pipeline":
        for layer in target.layers:
            shard = spec(tensors(layer))
            objs += [(rel(pipeline_file_name(layer.index, r)), shard) for r in range(T)]
        objs += [(rel(sequential_file_name(r)), bookkeeping(target, None)) for r in range(T)]
    else:
        module = {f"sequential.{layer.index}.{k}": v
                  for layer in target.layers for k, v in spec(tensors(layer)).items()}
        objs += [(rel(sequential_file_name(r)), bookkeeping(target, module)) for r in range(T)]
    files = [(name, plan_archive(obj, archive_name=archive_name_for(name)).size) for name, obj in objs]
    divisor = vocab_divisor(target.config.vocab_size or 0, T, target.tokenizer_size)
    files.append((f"configs/{CONFIG_NAME}", len(neox_yaml(target, divisor).encode())))
    if tokenizer is not None:
        files.append((TOKENIZER_NAME, tokenizer.stat().st_size))
    files.append(("latest", len(target.step_name.encode())))
    where, free = free_bytes(out)
    return NeoXOutputPlan(out_dir=Path(out), tp_degree=T, layout=target.layout, step=target.step, dtype=target.dtype,
                          key_generation=target.generation, files=files, out_free_bytes=free,
                          out_free_bytes_at=str(where), out_problem=out_problem(out),
                          train_impl="rm" if target.config.reward_model else "normal")


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


def _remove_private_folders(folder: OutputFolder) -> None:
    """The private folders an earlier version's writer left when killed (``.neoxconv-pt-*.neoxconv-tmp``,
    ``.staging.neoxconv-tmp``; this version writes hidden temporaries beside the final names), in an OUT that
    is ours: our files in them are removed, a folder only when then empty; a link under such a name is never
    followed (every step through the run's held folders, `OutDir`)."""
    dirs = folder.dirs
    for step in _step_folders(folder.out):
        for name in sorted(dirs.listdir(step)):
            rel = f"{step}/{name}"
            private = name.startswith(PRIVATE_PREFIX) and name.endswith(TMP_SUFFIX)
            if not (private or name == LEGACY_STAGING) or not dirs.is_folder(rel):
                continue
            for inside in dirs.listdir(rel):
                if is_neox_output_name(f"{step}/{inside}") and dirs.is_file(f"{rel}/{inside}"):
                    dirs.remove(f"{rel}/{inside}")
            dirs.rmdir(rel)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class _Group:
    """Files written together from the same source layers, all ranks side by side: a pipeline layer's rank
    files, the sequential layout's mp_rank files (every layer), or the pipeline layout's bookkeeping files."""

    names: list[str]  # one per rank
    layers: list[SourceLayer]
    fingerprint: str
    ranks: list[int] = field(default_factory=list)  # the ranks whose files this run writes
    sequential: bool = False
    bookkeeping: bool = False


def write_neox_checkpoint(
    out: Path,
    target: NeoXTarget,
    feed: LayerStream,
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
    """Write the checkpoint, every rank's file of a layer side by side, from ``feed`` (`LayerStream`).

    ``source`` says which source this is (a different one is refused without --force); ``fingerprint(layers)``
    is the proof of what those source layers hold (JSON-able), recorded with each file: a resumed run keeps a
    file only when its fingerprint is unchanged, its bytes hash as recorded, and (inf/nan in it) this run allows
    non-finite values. Every tensor is checked for inf/nan as it is written (`report_nonfinite`), before its
    file is renamed into place.

    Memory: the staging buffers of T open files and one row block, whatever the layer count or width. The
    source is read once: each block goes to every rank that needs part of it. Sequential layout: the T
    ``mp_rank`` files are written side by side, layer after layer. OUT is held through `OutputFolder` (locked)
    for the whole run; a file enters the journal once ``feed.confirmed`` says its source bytes passed their
    check (on a failure, files not confirmed yet are removed).
    """
    t0 = time.monotonic()
    out = Path(out)
    T = target.tp_degree
    spec = FolderSpec(kind=NEOX, command=desc, is_ours=is_neox_output_name, noun="NeoX output",
                      folders=(target.step_name, "configs"), stale_folders=_step_folders)

    def rel(name: str) -> str:
        return f"{target.step_name}/{name}"

    groups: list[_Group] = []
    if target.layout == "pipeline":
        for layer in target.layers:
            groups.append(_Group([rel(pipeline_file_name(layer.index, r)) for r in range(T)], [layer],
                                 _digest(fingerprint([layer]))))
        groups.append(_Group([rel(sequential_file_name(r)) for r in range(T)], [], _digest(fingerprint([])),
                             bookkeeping=True))
    else:
        groups.append(_Group([rel(sequential_file_name(r)) for r in range(T)], target.layers,
                             _digest(fingerprint(target.layers)), sequential=True))
    rows = target.config.vocab_size or 0
    divisor = vocab_divisor(rows, T, target.tokenizer_size)
    small = {f"configs/{CONFIG_NAME}": neox_yaml(target, divisor).encode()}
    if tokenizer is not None:
        small[TOKENIZER_NAME] = read_small_bytes(tokenizer, CheckpointError, TOKENIZER_MAX_BYTES)  # (checked so)
    small["latest"] = target.step_name.encode()

    def allowed(e: FileEntry) -> bool:
        return allow_nonfinite or not e.nonfinite

    doing = "splitting" if desc == "split" else "resharding"

    with OutputFolder(out, spec, source=source, options=recorded, hash_algo=hash_algo, resume=resume,
                      force=force) as folder:
        if folder.ours:
            _remove_private_folders(folder)
        # which files are kept (same inputs, allowed, hash as recorded), what else changes: decided before writing
        todo: list[_Group] = []
        reused = kept_bytes = 0
        with recheck_bar(sum(folder.resumable_bytes(n, g.fingerprint) for g in groups for n in g.names),
                         quiet=quiet) as rbar:
            for g in groups:
                guard.check()
                kept = {n: folder.reusable(n, g.fingerprint, allowed) for n in g.names}
                rbar.update(sum(folder.resumable_bytes(n, g.fingerprint) for n in g.names))
                redo = [r for r, n in enumerate(g.names) if kept[n] is None]
                if g.sequential:  # each rank's file holds every layer: kept or redone on its own
                    folder.keep({n: e for n, e in kept.items() if e is not None})
                    reused += T - len(redo)
                    kept_bytes += sum(_tensor_bytes(folder, n) for n, e in kept.items() if e is not None)
                elif not redo:
                    folder.keep(kept)
                    reused += 0 if g.bookkeeping else T
                    kept_bytes += 0 if g.bookkeeping else sum(_tensor_bytes(folder, n) for n in g.names)
                    continue
                else:
                    redo = list(range(T))
                if redo:
                    g.ranks = redo
                    todo.append(g)
        folder.begin([n for g in groups for n in g.names], small, planned_bytes if todo else 0)
        written = bytes_written = 0
        unconfirmed: list[tuple[_Group, dict[str, FileEntry]]] = []

        def write_group(g: _Group, bar) -> dict[str, FileEntry]:
            names = [g.names[r] for r in g.ranks]
            if g.bookkeeping:
                return {n: _entry(*save_pt(folder.file(n), bookkeeping(target, None), hash_algo=folder.hash), g, 0, [])
                        for n in names}
            per_layer = [feed.tensors(layer) for layer in g.layers]
            if g.sequential:
                module = {f"sequential.{layer.index}.{t.key}": TensorSpec(t.dtype, t.shape)
                          for layer, ts in zip(g.layers, per_layer) for t in ts}
                objs = [bookkeeping(target, module) for _ in g.ranks]
            else:
                objs = [{t.key: TensorSpec(t.dtype, t.shape) for t in per_layer[0]} for _ in g.ranks]
            slot = {r: i for i, r in enumerate(g.ranks)}  # rank -> open file
            warnings: list[list[str]] = [[] for _ in g.ranks]
            nonfinite = [0] * len(g.ranks)
            with PtFiles([folder.file(n) for n in names], objs, hash_algo=folder.hash) as files:
                for layer, tensors in zip(g.layers, per_layer):
                    guard.check()
                    bar.set_postfix_str(layer.label, refresh=False)
                    counts = [[0] * len(tensors) for _ in g.ranks]  # inf/nan per rank and tensor
                    feed.stream(layer, _RankSink(files, slot, tensors, counts, bar, guard))
                    for i, r in enumerate(g.ranks):  # rank by rank, in key order, before the files are renamed
                        for t, n in zip(tensors, counts[i]):
                            report_nonfinite(n, f"{layer.label} (rank {r}): {t.key!r}", t.dtype,
                                             allow=allow_nonfinite, warnings=warnings[i], doing=doing)
                            nonfinite[i] += n
            return {n: _entry(files.digests[i], files.sizes[i], g, nonfinite[i], warnings[i])
                    for i, n in enumerate(names)}

        def _entry(digest: str, size: int, g: _Group, nonfinite: int, warnings: list[str]) -> FileEntry:
            return FileEntry(size=size, algo=folder.hash, digest=digest, fingerprint=g.fingerprint,
                             nonfinite=nonfinite, warnings=warnings)

        try:
            # the bar counts tensor bytes as they are written: of a resumed run, only what is left (it ends at 100%)
            with progress_bar(total=max(planned_bytes - kept_bytes, 0), desc=desc, unit="B",
                              quiet=quiet or not todo) as bar:
                for g in todo:
                    guard.check()
                    entries = write_group(g, bar)
                    if not g.bookkeeping:
                        written += len(entries)
                        bytes_written += sum(e.size for e in entries.values())
                    unconfirmed.append((g, entries))
                    done = [(grp, e) for grp, e in unconfirmed if feed.confirmed(grp.layers)]
                    if done:  # progress survives a crash from here on
                        folder.record({n: e for _, es in done for n, e in es.items()})
                        unconfirmed = [u for u in unconfirmed if u not in done]
                    guard.check()
                if unconfirmed:
                    feed.settle()
                    folder.record({n: e for g, es in unconfirmed if feed.confirmed(g.layers) for n, e in es.items()})
                    unconfirmed = [u for u in unconfirmed if not feed.confirmed(u[0].layers)]
                if unconfirmed:
                    raise RuntimeError(f"{out}: source reads of {unconfirmed[0][0].names[0]} were never checked")
        except BaseException:
            for _, entries in unconfirmed:  # written from source bytes whose check did not pass (or did not run)
                for name in entries:
                    folder.dirs.remove(name)
            raise
        state = folder.finish({"config": dataclasses.asdict(target.config),
                               "make_vocab_size_divisible_by": divisor})
    entries = state.entries.values()
    row_bias = "rank0" if target.config.parallel_residual else "replicated"
    return WriteReport(out_dir=out, tp_degree=T, layout=target.layout, step=target.step, files_written=written,
                       files_reused=reused, total_bytes=sum(e.size for e in entries),
                       make_vocab_size_divisible_by=divisor, dtype=target.dtype, row_bias=row_bias,
                       bytes_written=bytes_written, seconds=time.monotonic() - t0,
                       warnings=[w for e in entries for w in e.warnings])
