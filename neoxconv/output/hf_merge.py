"""`merge_checkpoint`: the whole merge job, one source layer at a time, resumable and crash-safe.

Order of work:
1. preflight (no tensor data read): locate files, parse every archive's tensor description, check every
   layer against the rule table and config, check the output folder and the free disk space;
2. per layer: merge the small tensors (sums, replicas, dropped buffers) in memory, then stream the
   concatenated weights into ``model-XXXXX-of-YYYYY.safetensors`` (temp name, fsync, rename), then record
   the layer in the journal ``.neoxconv-journal.json``;
3. config.json, tokenizer files, ``model.safetensors.index.json`` and finally the manifest ``neoxconv.json``.

An interrupted run leaves the journal; the same command resumes, keeping every layer whose file still
matches its recorded hash (BLAKE3 by default, sha256 with ``hash="sha256"``; see `neoxconv.output.hashing`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neoxconv.config import NeoXConfig
from neoxconv.dtypes import count_nonfinite
from neoxconv.errors import CheckpointError, MergeError, OutputError, UsageError, few
from neoxconv.interrupt import InterruptGuard, deferred_sigint
from neoxconv.merge import QkvLayout, Rule, check_derived, check_replicas, merge_tensor
from neoxconv.output.finite import report_nonfinite
from neoxconv.output.folder import (
    HF,
    INDEX,
    FileEntry,
    FolderSpec,
    OutputFolder,
    check_out_path,
    competing_weight_files,
    is_output_name,
)
from neoxconv.output.hashing import DEFAULT_HASH, check_algorithm
from neoxconv.output.hub import (
    CARD,
    DEFAULT_LICENSE,
    GENERATION_CONFIG,
    CardFacts,
    check_license,
    generation_config,
    model_card,
    public_command,
)
from neoxconv.output.prefetch import prefetch
from neoxconv.output.streaming import iter_merged_chunks, stream_tensor, streams_direct
from neoxconv.output.writer import OutFile, SafetensorsWriter, json_bytes
from neoxconv.plan.fingerprint import config_digest, layer_fingerprint, source_identity
from neoxconv.plan.plan import LayerPlan, PlanOptions, SourcePlan, TensorPlan, plan_source
from neoxconv.progress import format_bytes, progress_bar, recheck_bar
from neoxconv.source.checkpoint import Checkpoint
from neoxconv.source.storage import Reads, SourceReader
from neoxconv.source.tokenizer import HF_JSON, TokenizerInfo, check_tokenizer, output_files, token_content

log = logging.getLogger(__name__)

FOLDER = FolderSpec(kind=HF, command="merge", is_ours=is_output_name)


@dataclass(frozen=True)
class MergeOptions:
    """Everything that changes what `merge` writes (recorded in the manifest) or how it behaves."""

    dtype: str = "auto"  # auto | fp16 | bf16 | fp32
    row_bias: str = "auto"  # auto | sum | replicated
    qkv_layout: str = "auto"  # auto | blocked | interleaved (grouped-query attention of Llama-style models)
    replica_tolerance: float = 1e-2  # max |rank_k - rank_0| for replicated tensors
    allow_nonfinite: bool = False
    config_path: Path | None = None
    tokenizer_path: Path | None = None
    resume: bool = True
    force: bool = False
    quiet: bool = False
    hash: str = DEFAULT_HASH  # blake3 | sha256: the digest the manifest records for every file
    pad_token_id: int | None = None  # written to config.json and tokenizer_config.json; required for reward models
    license: str = DEFAULT_LICENSE  # the model card's license (a Hub id); the card only, no weight depends on it
    save_tokenizer: bool = True  # False (--no-tokenizer): found and checked (bos/eos ids), but not written to OUT

    def recorded(self, row_bias_rule: Rule, qkv: QkvLayout | None = None) -> dict[str, Any]:
        """The options that determine the output bytes (a resume must match them)."""
        out = {"dtype": self.dtype, "row_bias": row_bias_rule.value}
        if qkv is not None:
            out["qkv_layout"] = qkv.split.value
        return out


@dataclass
class MergeReport:
    out_dir: Path
    tp_degree: int
    layout: str
    files_written: int
    files_reused: int
    total_bytes: int  # tensor bytes of the whole model (the index's total_size)
    warnings: list[str] = field(default_factory=list)
    max_replica_divergence: float = 0.0
    bytes_written: int = 0  # bytes of the safetensors files written by this run (reused files not counted)
    seconds: float = 0.0  # the whole run: preflight, re-checking reused files, writing
    write_seconds: float = 0.0  # writing the files of this run (the rate is bytes_written over this)
    dtype: str | list[str] = ""  # the dtype(s) written
    num_layers: int = 0
    row_bias: str = ""  # the rule applied to row-parallel biases: sum | replicated
    tokenizer: str | None = None  # which tokenizer files were carried, and how they were found (names only)

    def to_json(self) -> dict[str, Any]:
        """The ``merge --json`` object."""
        return {
            "out": str(self.out_dir), "tp_degree": self.tp_degree, "layout": self.layout,
            "num_layers": self.num_layers, "dtype": self.dtype, "row_bias": self.row_bias,
            "files_written": self.files_written, "files_reused": self.files_reused,
            "bytes_written": self.bytes_written, "total_size": self.total_bytes, "seconds": round(self.seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "max_replica_divergence": self.max_replica_divergence, "warnings": list(self.warnings),
            "tokenizer": self.tokenizer,
        }

    def summary(self) -> str:
        """One line for people: what was written, how fast, in which dtype. The rate is what this run wrote over
        the time it took; a resumed run's re-check of the files it keeps is not part of it (it says "in all")."""
        spent = self.write_seconds if self.files_reused else self.seconds
        rate = f", {format_bytes(self.bytes_written / spent)}/s" if self.bytes_written and spent > 0 else ""
        dtype = self.dtype if isinstance(self.dtype, str) else "/".join(self.dtype)
        seconds = _seconds(spent)
        reused = f"{self.files_reused} reused" + (f" ({_seconds(self.seconds)} in all)" if self.files_reused else "")
        return (f"merged TP={self.tp_degree} ({self.layout}) -> {self.out_dir}: {self.files_written} file(s) "
                f"written ({format_bytes(self.bytes_written)} {dtype} in {seconds}{rate}), {reused}; "
                f"model {format_bytes(self.total_bytes)}; row-parallel biases: {self.row_bias}; "
                f"max replica divergence {self.max_replica_divergence:.3g}"
                + (f"; tokenizer: {self.tokenizer}" if self.tokenizer else ""))


def _seconds(s: float) -> str:
    return f"{s:.{2 if s < 10 else 1}f} s"


def with_pad_token(config: NeoXConfig, pad_token_id: int | None, *, source: object) -> NeoXConfig:
    """``config`` with ``--pad-token-id``; a reward model without one is refused (its score is that of the last
    token that is not padding: transformers needs the id to find it in a batch, as gpt-neox's converter asks)."""
    if pad_token_id is None:
        if config.reward_model:
            raise UsageError(f"{source}: train_impl rm (a reward model) needs --pad-token-id N: its score is read at "
                             "the last token that is not padding (e.g. --pad-token-id 1 for the GPT-NeoX-20B "
                             "tokenizer's <|padding|>)")
        return config
    if not 0 <= pad_token_id < (config.vocab_size or 0):
        raise UsageError(f"--pad-token-id {pad_token_id} is outside the vocabulary (size {config.vocab_size})")
    return config.with_(pad_token_id=pad_token_id)


def output_names(n: int) -> list[str]:
    """The weight file names of an output of ``n`` files, in order."""
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


_DIVERGENCE = "max_replica_divergence"


def _layer_meta(plan: LayerPlan, divergence: dict[str, float | None]) -> dict[str, Any]:
    """What the manifest records for a layer file beside its hash (``divergence``: by source key, the largest
    difference between replicated ranks, None or absent where there is none)."""
    tensors_meta: dict[str, Any] = {}
    for t in plan.tensors:
        meta: dict[str, Any] = {"source_key": t.key, "rule": t.rule_label, "dtype": t.out_dtype, "shape": list(t.shape)}
        if divergence.get(t.key) is not None:
            meta[_DIVERGENCE] = divergence[t.key]
        tensors_meta[t.hf_name] = meta
    return {"source_layer": plan.layer.index, "kind": plan.layer.kind.value, "source_files": list(plan.files),
            "tensors": tensors_meta, "dropped": {t.key: t.rule.value for t in plan.dropped}}


def _allowed(entry: FileEntry, plan: LayerPlan, options: MergeOptions) -> bool:
    """A finished layer may be kept under this run's options: its recorded description exactly what this merge
    would record (a hand-edited or foreign entry is redone, never carried over), its inf/nan only with
    --allow-nonfinite, its replicas' divergence a finite number within --replica-tolerance (as a fresh merge
    would check them)."""
    if entry.nonfinite and not options.allow_nonfinite:
        return False
    tensors = entry.meta.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(m, dict) for m in tensors.values()):
        return False
    divergences = [m[_DIVERGENCE] for m in tensors.values() if _DIVERGENCE in m]
    if not all(type(d) in (int, float) and math.isfinite(d) and 0 <= d <= options.replica_tolerance
               for d in divergences):
        return False
    recorded = {**entry.meta, "tensors": {n: {k: v for k, v in m.items() if k != _DIVERGENCE}
                                          for n, m in tensors.items()}}
    return recorded == json.loads(json.dumps(_layer_meta(plan, {})))


def _check_dropped(t: TensorPlan, where: str, reader: Reads, config: NeoXConfig) -> None:
    """Derived buffers are not written, but every rank must hold the same bytes (compared by storage), and they
    must be what the config derives (`check_derived`)."""
    if not reader.same(t.shards, key=t.key):
        ranks = ", ".join(r.path.name for r in t.shards)
        raise MergeError(f"{where}: derived buffer differs across ranks for {t.key!r} [{ranks}]")
    if t.key.endswith(".inv_freq") and math.prod(t.shards[0].shape) <= 1 << 16:  # (a small vector)
        check_derived(t.key, reader.read(t.shards[0], key=t.key), t.src_dtype, config, where)


def _merge_small(t: TensorPlan, tolerance: float, where: str, reader: Reads) -> tuple[np.ndarray, float | None]:
    """Sum / replicated: whole tensors in memory (they are vectors). Returns (value, divergence)."""
    arrays = [reader.read(r, key=t.key) for r in t.shards]
    divergence = None
    if t.rule is Rule.REPLICATED:
        divergence = check_replicas(arrays, dtype=t.src_dtype, tolerance=tolerance, key=t.key,
                                    ranks=[r.path.name for r in t.shards], where=where, row_bias=t.row_bias)
    return merge_tensor(t.rule, arrays, dtype=t.src_dtype, out_dtype=t.out_dtype), divergence


def _report_nonfinite(n: int, t: TensorPlan, where: str, allow: bool, warnings: list[str]) -> int:
    report_nonfinite(n, f"{where}: {t.key!r} ({t.hf_name})", t.out_dtype, allow=allow, warnings=warnings)
    return n


def _nonfinite(values: np.ndarray, t: TensorPlan, where: str, allow: bool, warnings: list[str]) -> int:
    return _report_nonfinite(count_nonfinite(values, t.out_dtype), t, where, allow, warnings)


def _write_layer(target: OutFile, plan: LayerPlan, options: MergeOptions, bar, guard: InterruptGuard,
                 reader: Reads, config: NeoXConfig) -> FileEntry:
    where = f"{plan.layer.label} [{', '.join(plan.files)}]"
    warnings: list[str] = []
    nonfinite = 0
    small: dict[str, tuple[np.ndarray, float | None]] = {}
    for t in plan.dropped:
        _check_dropped(t, where, reader, config)
    for t in plan.tensors:
        if t.rule in (Rule.SUM, Rule.REPLICATED):
            small[t.key] = _merge_small(t, options.replica_tolerance, where, reader)
            nonfinite += _nonfinite(small[t.key][0], t, where, options.allow_nonfinite, warnings)
    entries = [(t.hf_name, t.out_dtype, t.shape) for t in plan.tensors]

    def on_block(nbytes: int) -> None:
        guard.check()
        bar.update(nbytes)

    with SafetensorsWriter(target, entries, hash_algo=options.hash) as w:  # its thread hashes and writes
        for t in plan.tensors:
            guard.check()
            if t.key in small:
                w.write_chunk(t.hf_name, small[t.key][0])
                bar.update(t.nbytes)
            elif streams_direct(t):  # read straight into the output buffer, checked there
                n = stream_tensor(w, t, reader=reader, on_block=on_block)
                nonfinite += _report_nonfinite(n, t, where, options.allow_nonfinite, warnings)
            else:  # casts, views: a worker thread reads, CRC-checks, casts and interleaves the next chunk
                for chunk in prefetch(iter_merged_chunks(t, reader=reader)):
                    on_block(0)
                    nonfinite += _nonfinite(chunk, t, where, options.allow_nonfinite, warnings)
                    w.write_chunk(t.hf_name, chunk)
                    bar.update(chunk.nbytes)
    meta = _layer_meta(plan, {key: d for key, (_, d) in small.items()})
    return FileEntry(size=w.size, algo=w.hash_algo, digest=w.hexdigest(), nonfinite=nonfinite, warnings=warnings,
                     meta=meta)


def _small_files(ckpt: Checkpoint, config: NeoXConfig, config_dtype: str, names: list[str],
                 plans: list[LayerPlan], tokenizer: TokenizerInfo | None) -> dict[str, bytes]:
    """The bytes of config.json, generation_config.json, the tokenizer files and the index (written after the
    weights)."""
    hf_config = config.to_hf_dict(torch_dtype=config_dtype)
    small = {"config.json": json_bytes(hf_config), GENERATION_CONFIG: json_bytes(generation_config(hf_config))}
    if ckpt.tokenizer is not None and tokenizer is not None:
        small.update(output_files(ckpt.tokenizer, tokenizer, config.max_position_embeddings))
    if config.pad_token_id is not None and "tokenizer_config.json" in small:  # AutoTokenizer takes it as text
        pad = token_content(ckpt.tokenizer.path, config.pad_token_id) if ckpt.tokenizer.kind == HF_JSON else None
        if pad is None and ckpt.tokenizer.kind == HF_JSON:
            raise CheckpointError(f"{ckpt.tokenizer.path.name}: has no token with id {config.pad_token_id} "
                                  "(--pad-token-id); pass the id of the tokenizer's padding token")
        if pad is not None:
            tok_config = json.loads(small["tokenizer_config.json"])
            tok_config["pad_token"] = pad
            small["tokenizer_config.json"] = json_bytes(tok_config)
    weight_map = {t.hf_name: name for name, plan in zip(names, plans) for t in plan.tensors}
    small[INDEX] = json_bytes({"metadata": {"total_size": sum(p.nbytes for p in plans)},
                               "weight_map": dict(sorted(weight_map.items()))})
    return small


def _card_facts(src: Path, source_plan: SourcePlan, dtype: str, options: MergeOptions, layers: dict[str, FileEntry],
                names: list[str]) -> CardFacts:
    """What the model card says: the source, how it was read, and the checks this merge made."""
    ckpt, config = source_plan.checkpoint, source_plan.config
    hf = config.to_hf_dict(torch_dtype=dtype)
    generation = source_plan.key_generation
    qkv = source_plan.qkv
    if qkv is None:
        qkv_text = "fused, per head ([heads, 3, head_dim]), kept as GPT-NeoX lays it out"
    else:
        qkv_text = f"{qkv.split.value}" + (f" (assumed: {qkv.reason})" if qkv.assumed else "")
    entries = [layers[n] for n in names]
    divergence = max((m.get("max_replica_divergence", 0.0) for e in entries
                      for m in e.meta.get("tensors", {}).values() if isinstance(m, dict)), default=0.0)
    nonfinite = sum(e.nonfinite for e in entries)
    checks = ["every layer's tensor names, shapes and dtypes matched the key table and the config before any byte "
              "was written",
              "every source tensor's bytes matched the CRC-32 its archive records"]
    if ckpt.tp_degree > 1:
        checks.append(f"tensors every rank holds (norms) agreed across the {ckpt.tp_degree} ranks within "
                      f"--replica-tolerance {options.replica_tolerance:g} (largest difference {divergence:.3g})")
    if any(p.dropped for p in source_plan.layers):
        checks.append("derived buffers (rotary inv_freq), not written, were identical on every rank")
    checks.append("no inf/nan value in the written weights" if not nonfinite else
                  f"{nonfinite} inf/nan value(s) written, allowed by --allow-nonfinite")
    if ckpt.tokenizer is not None:
        checks.append(f"the tokenizer fits the embedding's {config.vocab_size} rows and its library loads it")
    checks.append(f"every file's {options.hash} recorded in neoxconv.json")
    return CardFacts(
        architecture=hf["architectures"][0], layout=ckpt.layout,
        step=ckpt.step_dir.name, tp_degree=ckpt.tp_degree,
        key_generation=(generation if isinstance(generation, str) else " + ".join(generation or [])) or "-",
        qkv_layout=qkv_text, row_bias=source_plan.row_bias.value, dtype=dtype,
        shape=(f"{config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} heads, "
               f"{config.vocab_size} vocabulary rows"),
        tokenizer=_tokenizer_text(ckpt, options), checks=checks, command=public_command(_command(src, options)),
        license=options.license)


def _tokenizer_text(ckpt: Checkpoint, options: MergeOptions) -> str:
    """Which tokenizer the model card and the summary name (and whether it was left out of OUT)."""
    if ckpt.tokenizer is None:
        return "none (no tokenizer found)"
    return ckpt.tokenizer.describe() + ("" if options.save_tokenizer else " (not written: --no-tokenizer)")


def _command(src: Path, options: MergeOptions) -> list[str]:
    """The merge command that makes this output: SRC as given (absolute paths are reduced to their name by
    `public_command`), OUT as ``OUT``, and the options that decide the output bytes when not their defaults (not
    --quiet, --json, --force, --no-resume). The same merge gives the same card, from the CLI or the library."""
    default = MergeOptions()
    argv = ["merge", str(src), "OUT"]
    for flag, value, default_value in (("--dtype", options.dtype, default.dtype),
                                       ("--row-bias", options.row_bias, default.row_bias),
                                       ("--qkv-layout", options.qkv_layout, default.qkv_layout),
                                       ("--replica-tolerance", f"{options.replica_tolerance:g}",
                                        f"{default.replica_tolerance:g}"),
                                       ("--config", options.config_path, None),
                                       ("--tokenizer", options.tokenizer_path, None),
                                       ("--hash", options.hash, default.hash),
                                       ("--license", options.license, default.license)):
        if value != default_value:
            argv += [flag, str(value)]
    return argv + (["--allow-nonfinite"] if options.allow_nonfinite else []) + \
        ([] if options.save_tokenizer else ["--no-tokenizer"])


def merge_checkpoint(src: Path, out: Path, options: MergeOptions | None = None) -> MergeReport:
    """Merge the tensor-parallel checkpoint at ``src`` into a Hugging Face folder ``out``.

    A first Ctrl-C is deferred to the next point where no file is half-written, then raises
    KeyboardInterrupt; the folder is left resumable.
    """
    with deferred_sigint() as guard, contextlib.ExitStack() as held:
        return _merge(src, out, options or MergeOptions(), guard, held)


def _merge(src: Path, out: Path, options: MergeOptions, guard: InterruptGuard,
           held: contextlib.ExitStack) -> MergeReport:
    out = Path(out)
    if not (math.isfinite(options.replica_tolerance) and options.replica_tolerance >= 0):
        raise UsageError(f"--replica-tolerance must be a finite number >= 0, got {options.replica_tolerance}")
    check_out_path(out)
    started = time.perf_counter()
    check_algorithm(options.hash)
    check_license(options.license)

    # ---- preflight: every archive's description, every layer's plan; no tensor data read ----
    source_plan = plan_source(src, PlanOptions(
        dtype=options.dtype, row_bias=options.row_bias, qkv_layout=options.qkv_layout,
        config_path=options.config_path, tokenizer_path=options.tokenizer_path))
    ckpt, config, plans = source_plan.checkpoint, source_plan.config, source_plan.layers
    row_bias, qkv = source_plan.row_bias, source_plan.qkv
    # what decided each layer's bytes besides its source inputs: the model config (e.g. a head count fixed in
    # the YAML changes how blocks are merged, not their source files)
    model = config_digest(config)
    tokenizer = None
    if ckpt.tokenizer is not None:
        tokenizer = check_tokenizer(ckpt.tokenizer, config.vocab_size)
        if tokenizer.eos_id is not None:
            bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
            config = config.with_(bos_token_id=bos, eos_token_id=tokenizer.eos_id)
    config = with_pad_token(config, options.pad_token_id, source=ckpt.config_source)
    dtypes = {t.out_dtype for p in plans for t in p.tensors}
    config_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"

    source = source_identity(ckpt, out)
    recorded = options.recorded(row_bias, qkv)
    names = output_names(len(plans))
    fingerprints = {name: {**layer_fingerprint(plan, ckpt.step_dir), "config": model}
                    for name, plan in zip(names, plans)}
    small = _small_files(ckpt, config, config_dtype, names, plans, tokenizer if options.save_tokenizer else None)
    folder = held.enter_context(OutputFolder(out, FOLDER, source=source, options=recorded, hash_algo=options.hash,
                                             resume=options.resume, force=options.force))
    competing = competing_weight_files(out, names)  # (after the folder removed what was ours)
    if competing:
        raise OutputError(f"{out}: holds {few(competing)}, weight files this merge does not write that transformers' "
                          "from_pretrained may load instead of the merged ones; remove them, or choose another OUT")

    # which layers are already done (same inputs, allowed under these options, file present, its hash as
    # recorded); a bar while re-hashing them
    recheck = {name: folder.resumable_bytes(name, fingerprints[name]) for name in names}
    todo: list[tuple[str, LayerPlan]] = []
    with recheck_bar(sum(recheck.values()), quiet=options.quiet) as bar:
        for name, plan in zip(names, plans):
            bar.set_postfix_str(name, refresh=False)
            entry = folder.reusable(name, fingerprints[name], lambda e, plan=plan: _allowed(e, plan, options))
            if entry is not None:
                folder.keep({name: entry})
            else:
                todo.append((name, plan))
            bar.update(recheck[name])
    folder.begin(names, small, sum(p.nbytes for _, p in todo) + (1 << 20))

    # ---- the merge ----
    total = sum(p.nbytes for _, p in todo)
    guard.check()
    writing = time.perf_counter()
    # A storage shared by several layers (a ZeRO flat buffer) is CRC-checked when the last layer that reads it
    # is done (the reader's plan); a layer enters the journal only once every storage it read from has passed.
    unconfirmed: list[tuple[str, FileEntry | None, list]] = []
    layer_refs = [[r for t in [*plan.tensors, *plan.dropped] for r in t.shards] for _, plan in todo]
    with progress_bar(total=total, desc="merge", unit="B", quiet=options.quiet or not todo) as bar, \
            SourceReader(plan=layer_refs) as reader:
        try:
            for (name, plan), refs in zip(todo, layer_refs):
                guard.check()
                bar.set_postfix_str(f"{plan.layer.label} -> {name}", refresh=False)
                unconfirmed.append((name, None, refs))  # its file is not trusted until its storages pass
                with reader.scope() as reads:  # checks what the layer read as it closes (or with a later layer)
                    entry = _write_layer(folder.file(name), plan, options, bar, guard, reads, config)
                entry.fingerprint = fingerprints[name]
                unconfirmed[-1] = (name, entry, refs)
                confirmed = {n: e for n, e, rs in unconfirmed if e is not None and reader.verified(rs)}
                if confirmed:
                    folder.record(confirmed)  # progress survives a crash from here on
                    unconfirmed = [u for u in unconfirmed if u[0] not in confirmed]
        except BaseException:
            for name, _, _ in unconfirmed:  # written from data whose CRC was not (or could not be) confirmed
                folder.dirs.remove(name)
            raise
        guard.check()
    write_seconds = time.perf_counter() - writing

    # ---- config, tokenizer, index, then the manifest (last) ----
    layers = folder.state.layers
    warnings = [w for name in names for w in layers[name].warnings]
    divergences = [m.get("max_replica_divergence", 0.0) for name in names
                   for m in layers[name].meta.get("tensors", {}).values()]
    info: dict[str, Any] = {"config": asdict(config), "tokenizer": ckpt.tokenizer.name if ckpt.tokenizer else None,
                            "max_replica_divergence": max(divergences, default=0.0)}
    if ckpt.tokenizer is not None:  # which files, and how they were found (names only, never a path)
        info["tokenizer_source"] = {"kind": ckpt.tokenizer.kind, "found_by": ckpt.tokenizer.found_by,
                                    "files": [p.name for _, p in ckpt.tokenizer.files],
                                    "written": sorted(n for n in small
                                                      if n.startswith(("tokenizer", "vocab", "merges")))}
    if qkv is not None:
        info["qkv_layout"] = {"split": qkv.split.value, "assumed": qkv.assumed, "reason": qkv.reason}
        if qkv.assumed:
            warnings.append(f"assumed QKV layout {qkv.split.value}: {qkv.reason}")
    if source_plan.fp8_state:  # Transformer Engine's fp8 scaling state: said, not converted
        warnings.append(source_plan.fp8_state)
        log.warning("%s", source_plan.fp8_state)
    info["warnings"] = warnings
    card = model_card(_card_facts(src, source_plan, config_dtype, options, folder.state.layers, names))
    for name in folder.hand_over({CARD: card.encode()}):
        log.warning("%s: kept as it is (edited since neoxconv wrote it, or not written by neoxconv); the card this "
                    "merge would write differs from it: delete the file and re-run to get the new one", out / name)
    folder.finish(info)
    if ckpt.tokenizer is None:
        log.warning("no tokenizer found next to the checkpoint; pass --tokenizer FILE to include one")
    out_dtypes = sorted({t.out_dtype for p in plans for t in p.tensors})
    report = MergeReport(
        out_dir=out, tp_degree=ckpt.tp_degree, layout=ckpt.layout, files_written=len(todo),
        files_reused=len(plans) - len(todo), total_bytes=sum(p.nbytes for p in plans), warnings=warnings,
        max_replica_divergence=info["max_replica_divergence"],
        bytes_written=sum(layers[name].size for name, _ in todo),
        seconds=time.perf_counter() - started, write_seconds=write_seconds,
        dtype=out_dtypes[0] if len(out_dtypes) == 1 else out_dtypes,
        num_layers=config.num_layers, row_bias=row_bias.value,
        tokenizer=_tokenizer_text(ckpt, options) if ckpt.tokenizer is not None else None,
    )
    return report
