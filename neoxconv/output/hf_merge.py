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
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neoxconv import __version__
from neoxconv.dtypes import count_nonfinite
from neoxconv.errors import MergeError, OutputError, UsageError
from neoxconv.plan.fingerprint import layer_fingerprint, source_identity
from neoxconv.output.hashing import DEFAULT_HASH, check_algorithm, file_matches, with_hash
from neoxconv.check.integrity import INDEX, MANIFEST
from neoxconv.interrupt import InterruptGuard, deferred_sigint
from neoxconv.merge import QkvLayout, Rule, check_replicas, merge_tensor
from neoxconv.plan.plan import LayerPlan, PlanOptions, TensorPlan, plan_source
from neoxconv.output.folder import (JOURNAL, OutputLock, check_out_path, foreign_entries, load_state, make_out_dir,
                             remove_file, remove_previous_output, remove_stale_temps)
from neoxconv.output.prefetch import prefetch
from neoxconv.progress import format_bytes, progress_bar
from neoxconv.source.storage import Reads, SourceReader
from neoxconv.output.streaming import iter_merged_chunks, stream_tensor, streams_direct
from neoxconv.source.tokenizer import checked_token_count, eos_token_id, tokenizer_config
from neoxconv.output.writer import SafetensorsWriter, atomic_write, atomic_write_json

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1


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
    seconds: float = 0.0
    dtype: str | list[str] = ""  # the dtype(s) written
    num_layers: int = 0
    row_bias: str = ""  # the rule applied to row-parallel biases: sum | replicated

    def to_json(self) -> dict[str, Any]:
        """The ``merge --json`` object."""
        return {
            "out": str(self.out_dir), "tp_degree": self.tp_degree, "layout": self.layout,
            "num_layers": self.num_layers, "dtype": self.dtype, "row_bias": self.row_bias,
            "files_written": self.files_written, "files_reused": self.files_reused,
            "bytes_written": self.bytes_written, "total_size": self.total_bytes, "seconds": round(self.seconds, 3),
            "max_replica_divergence": self.max_replica_divergence, "warnings": list(self.warnings),
        }

    def summary(self) -> str:
        """One line for people: what was written, how fast, in which dtype."""
        rate = f", {format_bytes(self.bytes_written / self.seconds)}/s" if self.bytes_written and self.seconds > 0 else ""
        dtype = self.dtype if isinstance(self.dtype, str) else "/".join(self.dtype)
        seconds = f"{self.seconds:.{2 if self.seconds < 10 else 1}f} s"
        return (f"merged TP={self.tp_degree} ({self.layout}) -> {self.out_dir}: {self.files_written} file(s) "
                f"written ({format_bytes(self.bytes_written)} {dtype} in {seconds}{rate}), {self.files_reused} reused; "
                f"model {format_bytes(self.total_bytes)}; row-parallel biases: {self.row_bias}; "
                f"max replica divergence {self.max_replica_divergence:.3g}")


def output_names(n: int) -> list[str]:
    """The weight file names of an output of ``n`` files, in order."""
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _prepare_out(out: Path, state: dict | None, source: dict, recorded: dict, options: MergeOptions) -> dict:
    """Decide whether OUT is ours before deleting anything; return the layer entries that may be reused.

    Called with OUT locked. Deletes only neoxconv's own temporaries (once OUT is known to be ours) and,
    with --force over another neoxconv output, only the files that output's manifest lists and that are
    named like neoxconv's outputs.
    """
    if state is None:
        foreign = foreign_entries(out)
        if foreign and not options.force:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputError(
                f"{out}: the folder is not empty ({shown}) and is not a neoxconv output; choose an empty folder "
                "or pass --force (neoxconv only overwrites the files it writes)"
            )
        return {}  # nothing deleted: a foreign folder's files, even ones named like ours, are not ours
    same_source = _same_source(state.get("source"), source)
    same = same_source and state.get("options") == recorded
    if not same and state.get("layers"):
        # the same source with other options and --no-resume: the user asked to redo it all
        if not (options.force or (same_source and not options.resume)):
            what, fix = (("made with other options", "use --no-resume or another OUT") if same_source else
                         ("of a different source", "use another OUT, or --force to replace it"))
            raise OutputError(f"{out}: holds a neoxconv merge {what}: "
                              f"{'; '.join(describe_differences(state, source, recorded))}; {fix}")
        _remove_previous_output(out, state)
        return {}
    remove_stale_temps(out)  # ours: temporaries of an interrupted run
    if not same or not options.resume:  # an earlier run that stopped before its first layer, or --no-resume
        return {}
    layers = state.get("layers")
    return dict(layers) if isinstance(layers, dict) else {}


def _same_source(recorded: Any, source: dict) -> bool:
    """Same checkpoint (folder, layout, TP degree, file names); what changed inside is found per layer.

    Manifests written before per-layer fingerprints listed files as {name, size}: compared by name, their
    layers (which carry no fingerprint) are all redone.
    """
    if not isinstance(recorded, dict):
        return False
    files = recorded.get("files")
    if isinstance(files, list):
        recorded = {**recorded, "files": [f.get("name") if isinstance(f, dict) else f for f in files]}
    return all(recorded.get(k) == v for k, v in source.items())


def describe_differences(state: dict, source: dict, recorded: dict) -> list[str]:
    """What differs between the run recorded in ``state`` and this one, as 'what: before, now' phrases."""
    before_src = state.get("source") if isinstance(state.get("source"), dict) else {}
    before_opts = state.get("options") if isinstance(state.get("options"), dict) else {}
    diffs = []
    for key in ("step_dir", "layout", "tp_degree"):
        if before_src.get(key) != source.get(key):
            diffs.append(f"source {key.replace('_', ' ')}: {before_src.get(key)} before, {source.get(key)} now")
    if not diffs and before_src.get("files") != source.get("files"):  # file names (changed contents: per layer)
        listed = before_src.get("files") if isinstance(before_src.get("files"), list) else []
        before_files = {str(f.get("name") if isinstance(f, dict) else f) for f in listed}
        changed = sorted(before_files ^ set(source["files"]))
        diffs.append(f"source files changed since that merge ({', '.join(changed[:3])}"
                     + (f" and {len(changed) - 3} more" if len(changed) > 3 else "") + ")")
    for key in sorted(before_opts.keys() | recorded.keys()):
        before = before_opts.get(key)
        if before != recorded.get(key):
            if key == "dtype" and before == "auto":  # say what auto wrote
                layers = state.get("layers") if isinstance(state.get("layers"), dict) else {}
                written = {m.get("dtype") for e in layers.values() if isinstance(e, dict)
                           for m in (e.get("tensors") or {}).values() if isinstance(m, dict)}
                before = f"auto ({written.pop()})" if len(written) == 1 else before
            diffs.append(f"{key.replace('_', '-')}: {before} before, {recorded.get(key)} now")
    return diffs or ["its manifest does not match this run"]


def _reusable_entry(out: Path, name: str, plan: LayerPlan, entry: dict | None, fingerprint: dict) -> dict | None:
    """The journal entry of a finished file worth re-hashing: same source layer made from the same inputs
    (`layer_fingerprint`), present, the recorded size."""
    path = out / name
    if isinstance(entry, dict) and entry.get("source_layer") == plan.layer.index \
            and entry.get("source_fingerprint") == fingerprint and path.is_file() \
            and path.stat().st_size == entry.get("size"):
        return entry
    return None


def _remove_previous_output(out: Path, state: dict) -> None:
    """--force over another neoxconv output: remove the files its manifest lists that neoxconv writes."""
    listed = []
    for section in ("layers", "files"):
        entries = state.get(section)
        if isinstance(entries, dict):
            listed += [str(name) for name in entries]
    remove_previous_output(out, [*listed, MANIFEST, JOURNAL])


def _check_disk(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if need > free:
        raise OutputError(
            f"{out}: needs {need / 1e9:.2f} GB for the merged model but only {free / 1e9:.2f} GB is free"
        )


def _check_dropped(t: TensorPlan, where: str, reader: Reads) -> None:
    """Derived buffers are not written, but every rank must hold the same bytes (compared by storage)."""
    if not reader.same(t.shards, key=t.key):
        ranks = ", ".join(r.path.name for r in t.shards)
        raise MergeError(f"{where}: derived buffer differs across ranks for {t.key!r} [{ranks}]")


def _merge_small(t: TensorPlan, tolerance: float, where: str, reader: Reads) -> tuple[np.ndarray, float | None]:
    """Sum / replicated: whole tensors in memory (they are vectors). Returns (value, divergence)."""
    arrays = [reader.read(r, key=t.key) for r in t.shards]
    divergence = None
    if t.rule is Rule.REPLICATED:
        divergence = check_replicas(arrays, dtype=t.src_dtype, tolerance=tolerance, key=t.key,
                                    ranks=[r.path.name for r in t.shards], where=where, row_bias=t.row_bias)
    return merge_tensor(t.rule, arrays, dtype=t.src_dtype, out_dtype=t.out_dtype), divergence


def _nonfinite(values: np.ndarray, t: TensorPlan, where: str, allow: bool, warnings: list[str]) -> None:
    _report_nonfinite(count_nonfinite(values, t.out_dtype), t, where, allow, warnings)


def _report_nonfinite(n: int, t: TensorPlan, where: str, allow: bool, warnings: list[str]) -> None:
    if n:
        msg = f"{where}: {t.key!r} ({t.hf_name}) has {n} non-finite value(s) (inf/nan) after merging to {t.out_dtype}"
        if not allow:
            raise MergeError(msg + "; pass --allow-nonfinite to write it anyway")
        warnings.append(msg)
        log.warning(msg)


def _write_layer(path: Path, plan: LayerPlan, options: MergeOptions, warnings: list[str], bar,
                 guard: InterruptGuard, reader: Reads) -> dict[str, Any]:
    where = f"{plan.layer.label} [{', '.join(plan.files)}]"
    small: dict[str, tuple[np.ndarray, float | None]] = {}
    for t in plan.dropped:
        _check_dropped(t, where, reader)
    for t in plan.tensors:
        if t.rule in (Rule.SUM, Rule.REPLICATED):
            small[t.key] = _merge_small(t, options.replica_tolerance, where, reader)
            _nonfinite(small[t.key][0], t, where, options.allow_nonfinite, warnings)
    entries = [(t.hf_name, t.out_dtype, t.shape) for t in plan.tensors]

    def on_block(nbytes: int) -> None:
        guard.check()
        bar.update(nbytes)

    with SafetensorsWriter(path, entries, hash_algo=options.hash) as w:  # its thread hashes and writes
        for t in plan.tensors:
            guard.check()
            if t.key in small:
                w.write_chunk(t.hf_name, small[t.key][0])
                bar.update(t.nbytes)
            elif streams_direct(t):  # read straight into the output buffer, checked there
                n = stream_tensor(w, t, reader=reader, on_block=on_block)
                _report_nonfinite(n, t, where, options.allow_nonfinite, warnings)
            else:  # casts, views: a worker thread reads, CRC-checks, casts and interleaves the next chunk
                for chunk in prefetch(iter_merged_chunks(t, reader=reader)):
                    on_block(0)
                    _nonfinite(chunk, t, where, options.allow_nonfinite, warnings)
                    w.write_chunk(t.hf_name, chunk)
                    bar.update(chunk.nbytes)
    tensors_meta: dict[str, Any] = {}
    for t in plan.tensors:
        meta: dict[str, Any] = {"source_key": t.key, "rule": t.rule_label, "dtype": t.out_dtype, "shape": list(t.shape)}
        if t.key in small and small[t.key][1] is not None:
            meta["max_replica_divergence"] = small[t.key][1]
        tensors_meta[t.hf_name] = meta
    return {
        "source_layer": plan.layer.index,
        "kind": plan.layer.kind.value,
        "source_files": plan.files,
        w.hash_algo: w.hexdigest(),
        "size": w.size,
        "tensors": tensors_meta,
        "dropped": {t.key: t.rule.value for t in plan.dropped},
    }


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
    # ---- preflight: every archive's description, every layer's plan; no tensor data read ----
    source_plan = plan_source(src, PlanOptions(
        dtype=options.dtype, row_bias=options.row_bias, qkv_layout=options.qkv_layout,
        config_path=options.config_path, tokenizer_path=options.tokenizer_path))
    ckpt, config, plans = source_plan.checkpoint, source_plan.config, source_plan.layers
    row_bias, qkv = source_plan.row_bias, source_plan.qkv
    if ckpt.tokenizer is not None:
        checked_token_count(ckpt.tokenizer, config.vocab_size)
        eos = eos_token_id(ckpt.tokenizer)
        if eos is not None:
            config = config.with_(bos_token_id=eos, eos_token_id=eos)
    dtypes = {t.out_dtype for p in plans for t in p.tensors}
    config_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"

    source = source_identity(ckpt)
    recorded = options.recorded(row_bias, qkv)
    make_out_dir(out)
    held.enter_context(OutputLock(out))  # released when the merge ends, however it ends
    reusable = _prepare_out(out, load_state(out), source, recorded, options)
    names = output_names(len(plans))
    state: dict[str, Any] = {
        "tool": "neoxconv", "version": __version__, "format": MANIFEST_FORMAT,
        "source": source, "options": recorded, "hash": options.hash, "layers": {},
    }

    # which layers are already done (same source inputs, file present, its hash as recorded); a bar while
    # re-hashing them
    todo: list[tuple[str, LayerPlan]] = []
    fingerprints = {name: layer_fingerprint(plan, ckpt.step_dir) for name, plan in zip(names, plans)}
    candidates = [(name, plan, _reusable_entry(out, name, plan, reusable.get(name), fingerprints[name]))
                  for name, plan in zip(names, plans)]
    recheck = sum(e["size"] for _, _, e in candidates if e)
    with progress_bar(total=recheck, desc="resume: re-check", unit="B",
                      quiet=options.quiet or not recheck) as bar:
        for name, plan, entry in candidates:
            if entry:
                bar.set_postfix_str(name, refresh=False)
                intact = file_matches(out / name, entry)
                bar.update(entry["size"])
                if intact:
                    state["layers"][name] = with_hash(entry, out / name, options.hash)
                    continue
            todo.append((name, plan))
    _check_disk(out, sum(p.nbytes for _, p in todo) + (1 << 20))
    if todo:  # a layer is about to change: the manifest only exists beside a complete output
        remove_file(out / MANIFEST)
    # a no-op re-run keeps the old manifest until the new one replaces it (a Ctrl-C never leaves none)
    atomic_write_json(out / JOURNAL, state)

    # ---- the merge ----
    warnings: list[str] = []
    total = sum(p.nbytes for _, p in todo)
    guard.check()
    # A storage shared by several layers (a ZeRO flat buffer) is CRC-checked when the last layer that reads it
    # is done (the reader's plan); a layer enters the journal only once every storage it read from has passed.
    unconfirmed: list[tuple[str, dict[str, Any], list]] = []
    layer_refs = [[r for t in [*plan.tensors, *plan.dropped] for r in t.shards] for _, plan in todo]
    with progress_bar(total=total, desc="merge", unit="B", quiet=options.quiet or not todo) as bar, \
            SourceReader(plan=layer_refs) as reader:
        try:
            for (name, plan), refs in zip(todo, layer_refs):
                guard.check()
                bar.set_postfix_str(f"{plan.layer.label} -> {name}", refresh=False)
                unconfirmed.append((name, {}, refs))  # its file is not trusted until its storages pass
                with reader.scope() as reads:  # checks what the layer read as it closes (or with a later layer)
                    entry = _write_layer(out / name, plan, options, warnings, bar, guard, reads)
                entry["source_fingerprint"] = fingerprints[name]
                unconfirmed[-1] = (name, entry, refs)
                confirmed = [(n, e) for n, e, rs in unconfirmed if reader.verified(rs)]
                if confirmed:
                    state["layers"].update(confirmed)
                    unconfirmed = [u for u in unconfirmed if u[0] not in state["layers"]]
                    atomic_write_json(out / JOURNAL, state)  # progress survives a crash from here on
        except BaseException:
            for name, _, _ in unconfirmed:  # written from data whose CRC was not (or could not be) confirmed
                (out / name).unlink(missing_ok=True)
            raise
        guard.check()
    state["layers"] = {n: state["layers"][n] for n in names}

    # ---- config, tokenizer, index, manifest (last) ----
    files: dict[str, str] = {}
    algo = options.hash
    files["config.json"] = atomic_write_json(out / "config.json", config.to_hf_dict(torch_dtype=config_dtype),
                                             hash_algo=algo)
    if ckpt.tokenizer is not None:
        files["tokenizer.json"] = atomic_write(out / "tokenizer.json", ckpt.tokenizer.read_bytes(), hash_algo=algo)
        files["tokenizer_config.json"] = atomic_write_json(
            out / "tokenizer_config.json", tokenizer_config(ckpt.tokenizer, config.max_position_embeddings),
            hash_algo=algo)
    weight_map = {t: name for name in names for t in state["layers"][name]["tensors"]}
    total_size = sum(p.nbytes for p in plans)
    files[INDEX] = atomic_write_json(
        out / INDEX, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
        hash_algo=algo)
    divergences = [m.get("max_replica_divergence", 0.0) for e in state["layers"].values() for m in e["tensors"].values()]
    state["files"] = {k: {algo: v, "size": (out / k).stat().st_size} for k, v in files.items()}
    state["config"] = asdict(config)
    state["tokenizer"] = ckpt.tokenizer.name if ckpt.tokenizer else None
    state["max_replica_divergence"] = max(divergences, default=0.0)
    if qkv is not None:
        state["qkv_layout"] = {"split": qkv.split.value, "assumed": qkv.assumed, "reason": qkv.reason}
        if qkv.assumed:
            warnings.append(f"assumed QKV layout {qkv.split.value}: {qkv.reason}")
    state["warnings"] = warnings
    atomic_write_json(out / MANIFEST, state)
    (out / JOURNAL).unlink(missing_ok=True)
    if ckpt.tokenizer is None:
        log.warning("no tokenizer found next to the checkpoint; pass --tokenizer FILE to include one")
    out_dtypes = sorted({t.out_dtype for p in plans for t in p.tensors})
    report = MergeReport(
        out_dir=out, tp_degree=ckpt.tp_degree, layout=ckpt.layout, files_written=len(todo),
        files_reused=len(plans) - len(todo), total_bytes=total_size, warnings=warnings,
        max_replica_divergence=state["max_replica_divergence"],
        bytes_written=sum(state["layers"][name]["size"] for name, _ in todo),
        seconds=time.perf_counter() - started, dtype=out_dtypes[0] if len(out_dtypes) == 1 else out_dtypes,
        num_layers=config.num_layers, row_bias=row_bias.value,
    )
    return report
