"""Check a merged folder before trusting it: manifest, sizes, hashes, safetensors headers vs config and index."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from neoxconv.source.checkpoint import model_layers
from neoxconv.config import NeoXConfig
from neoxconv.dtypes import FROM_SAFETENSORS, MAX_HEADER_BYTES, tensor_nbytes
from neoxconv.errors import CheckpointError, VerificationError
from neoxconv.output.folder import INDEX, JOURNAL, MANIFEST
from neoxconv.output.hashing import hash_file, recorded_hash
from neoxconv.merge import output_shapes


@dataclass
class IntegrityReport:
    """What `check_output` proved (``proven``) and what it could not (``not_proven``)."""

    manifest_found: bool
    files_checked: int = 0
    hashes_checked: bool = False  # every file's hash checked, weights included
    files_hashed: int = 0
    total_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    proven: list[str] = field(default_factory=list)
    not_proven: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = "; ".join(self.proven)
        if self.not_proven:
            text += "; NOT proven: " + "; ".join(self.not_proven)
        return text


def expected_tensors(config: NeoXConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor a merged model of this config holds."""
    out: dict[str, tuple[int, ...]] = {}
    for layer in model_layers(config, with_readout=not config.tie_word_embeddings):
        out.update(output_shapes(config, layer))  # type: ignore[arg-type]
    return out


def read_safetensors_header(path: Path) -> dict:
    return _read_header(path)[0]


def checked_safetensors_header(path: Path) -> dict:
    """The header of a safetensors file that safetensors itself would load: every entry well-formed, the
    data offsets tiling the data exactly (`ValueError` naming the first problem otherwise)."""
    header, data_len = _read_header(path)
    problems = _layout_problems(Path(path).name, header, data_len)
    if problems:
        raise ValueError(problems[0])
    return header


def _read_header(path: Path) -> tuple[dict, int]:
    """(header, bytes of tensor data after it)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"header length {n} is implausible")
        text = f.read(n)
        data_len = os.fstat(f.fileno()).st_size - 8 - n
    if len(text) != n:
        raise ValueError(f"header length {n} runs past the end of the file")
    if not text.startswith(b"{"):  # safetensors refuses anything else before the object
        raise ValueError("header does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError("__metadata__ is not a table of strings, which safetensors refuses to load")
    return header, data_len


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """JSON readers disagree on which of two same-named entries counts: refuse the header instead."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"header names {key!r:.80} twice")
        out[key] = value
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"header holds {name}, which is not JSON")


def _layout_problems(file: str, header: dict, data_len: int) -> list[str]:
    """Each tensor's data_offsets must match its dtype and shape, and together tile the data exactly
    (no overlap, no gap, nothing past the end): what safetensors itself requires before loading."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return [f"{file}: {name!r} has a malformed header entry"]
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), FROM_SAFETENSORS.get(info.get("dtype"))
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and dtype):
            return [f"{file}: {name!r} has malformed data_offsets/shape/dtype in its header"]
        if offsets[1] - offsets[0] != tensor_nbytes(dtype, tuple(shape)):
            return [f"{file}: {name!r} spans {offsets[1] - offsets[0]} bytes, its shape and dtype need "
                    f"{tensor_nbytes(dtype, tuple(shape))}"]
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = "overlaps the previous tensor" if start < end else "leaves a gap before it"
            return [f"{file}: {name!r} {what} (data_offsets start {start}, expected {end})"]
        end = stop
    if end != data_len:
        return [f"{file}: the tensors cover {end} bytes of data, the file holds {data_len} (truncated or padded)"]
    return []


def _hash_mismatch(path: Path, entry: dict) -> tuple[str, bool] | None:
    """(hash name, whether the file differs from the manifest's hash); None when it records no hash.

    The one place integrity hashes a file.
    """
    recorded = recorded_hash(entry)  # BLAKE3, or sha256 (--hash sha256, manifests from before BLAKE3)
    if recorded is None:
        return None
    return recorded[0], hash_file(path, recorded[0]) != recorded[1]


def load_config(out: Path) -> NeoXConfig:
    path = Path(out) / "config.json"
    if not path.is_file():  # an input problem (exit 4), not a failed check
        raise CheckpointError(f"{out}: no config.json, so not a folder written by 'neoxconv merge'; "
                              "pass the OUT folder of a merge")
    return NeoXConfig.from_hf_json(path)


def check_output(out: Path, config: NeoXConfig, *, hashes: bool | None = None,
                 hash_limit_bytes: int = 2 << 30, require_manifest: bool = True) -> IntegrityReport:
    """Raise `VerificationError` naming every missing, resized, modified or malformed file.

    With the manifest (``neoxconv.json``): every file it lists is present with its recorded size; the small
    files (config.json, the index, tokenizer files) are always hashed; the weight files are hashed when
    ``hashes`` is True, or when it is None and the weights total less than ``hash_limit_bytes``.
    Without it, the folder fails unless ``require_manifest=False`` (``verify --no-manifest``), and then only
    the headers are checked. Either way every safetensors header must agree with config.json and the index.
    """
    out = Path(out)
    problems: list[str] = []
    manifest = None
    if (out / MANIFEST).is_file():
        try:
            manifest = json.loads((out / MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            problems.append(f"{MANIFEST}: unreadable ({e})")
        else:
            if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), dict) \
                    or not isinstance(manifest.get("files"), dict):
                problems.append(f"{MANIFEST}: not a neoxconv manifest (no 'layers' and 'files' tables)")
                manifest = None
    report = IntegrityReport(manifest_found=manifest is not None)
    if not (out / INDEX).is_file():
        raise CheckpointError(f"{out}: no {INDEX}; not a finished merge output (re-run the merge to resume it)")
    try:
        weight_map = json.loads((out / INDEX).read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a {tensor: file} table")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError) as e:
        raise VerificationError(f"{out / INDEX}: unreadable index ({e})") from None

    small: dict[str, dict] = {}
    weights: dict[str, dict] = {}
    if manifest is not None:
        weights = {str(k): v for k, v in manifest["layers"].items()}
        small = {str(k): v for k, v in manifest["files"].items()}
    elif (out / JOURNAL).is_file():
        problems.append(f"no {MANIFEST} but a merge journal: the merge was interrupted; re-run it to finish")
    elif require_manifest:
        problems.append(f"no {MANIFEST}: nothing proves these files are the ones the merge wrote (it was deleted, "
                        "or the folder was not written by neoxconv); pass --no-manifest to check only the headers")
    else:
        report.notes.append(f"no {MANIFEST} (--no-manifest): headers checked, file contents not proven")
    index_files = sorted(set(weight_map.values()))
    total = sum((out / f).stat().st_size for f in index_files if _plain(f) and (out / f).is_file())
    report.total_bytes = total
    hash_weights = hashes if hashes is not None else total < hash_limit_bytes
    for entries, do_hash in ((weights, hash_weights), (small, True)):  # small files: always hashed
        for name, entry in entries.items():
            path = out / name
            if not _plain(name) or not isinstance(entry, dict):
                problems.append(f"{MANIFEST}: bad entry {name!r:.80}")
                continue
            if not path.is_file():
                problems.append(f"{name}: missing")
                continue
            size = path.stat().st_size
            if "size" in entry and size != entry["size"]:
                problems.append(f"{name}: size {size}, manifest says {entry['size']} (modified or truncated)")
                continue
            report.files_checked += 1
            if do_hash:
                checked = _hash_mismatch(path, entry)
                if checked is None:
                    problems.append(f"{name}: the manifest records no hash for it")
                elif checked[1]:
                    problems.append(f"{name}: {checked[0]} differs from the manifest (modified)")
                else:
                    report.files_hashed += 1
    if manifest is not None:
        for written in (INDEX, "config.json"):  # every merge writes both
            if written not in small:
                problems.append(f"{MANIFEST}: does not list {written}")
        added = sorted(p.name for p in out.glob("tokenizer*.json") if p.name not in small)
        if added:  # e.g. copied in after a merge without a tokenizer: verify uses it, unchecked
            report.not_proven.append(f"{', '.join(added)}: not in the manifest (added after the merge), not checked")
        unlisted = [f for f in index_files if f not in weights]
        if unlisted:
            problems.append(f"{INDEX}: names {_few(unlisted)}, which the manifest does not list (added file?)")
    report.hashes_checked = manifest is not None and bool(hash_weights)

    expected = expected_tensors(config)
    seen: dict[str, str] = {}
    read: set[str] = set()  # files whose header was read
    for file in index_files:
        path = out / file
        if not _plain(file):
            problems.append(f"{INDEX}: names {file!r:.80}, which is not a file in this folder")
            continue
        if not path.is_file():
            if file not in weights:
                problems.append(f"{file}: missing (named by {INDEX})")
            continue
        try:
            header, data_len = _read_header(path)
        except (OSError, ValueError, RecursionError) as e:
            problems.append(f"{file}: not a valid safetensors file ({e})")
            continue
        problems += _layout_problems(file, header, data_len)
        read.add(file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            seen[name] = file
            if weight_map.get(name) != file:
                problems.append(f"{file}: holds {name!r}, which {INDEX} places in {weight_map.get(name)!r}")
            if name not in expected:
                problems.append(f"{file}: unexpected tensor {name!r} for this config")
                continue
            info = info if isinstance(info, dict) else {}
            shape = tuple(info.get("shape") or ())
            if expected[name] is not None and shape != expected[name]:
                problems.append(f"{file}: {name!r} has shape {list(shape)}, config.json implies {list(expected[name])}")
            if info.get("dtype") not in FROM_SAFETENSORS or FROM_SAFETENSORS[info["dtype"]] not in (
                    "float16", "bfloat16", "float32"):
                problems.append(f"{file}: {name!r} has dtype {info.get('dtype')!r}")
    phantom = sorted(f"{name!r:.80} (in {file})" for name, file in weight_map.items() if file in read and name not in seen)
    if phantom:
        problems.append(f"{INDEX}: places tensors in files that do not hold them: {_few(phantom)}")
    missing = sorted(set(expected) - set(seen))
    if missing:
        problems.append(f"tensors missing from the safetensors files: {_few(missing, 8)}")
    if problems:
        raise VerificationError(f"{out}: the merged model does not match its manifest/config: "
                                + _few(problems, 12, "; "))

    headers = f"{len(index_files)} safetensors headers agree with config.json and {INDEX}"
    if manifest is None:
        report.proven.append(headers)
        report.not_proven.append(f"file contents (no {MANIFEST}, --no-manifest)")
        return report
    report.proven.append(f"{report.files_checked} files present with their recorded sizes")
    n_small = len(small)
    if hash_weights:
        report.proven.append(f"all {report.files_hashed} files' hashes match the manifest")
    else:
        report.proven.append(f"{n_small} small files' hashes (config, index, tokenizer) match the manifest")
        report.not_proven.append(f"the {len(weights)} weight files' contents (over {hash_limit_bytes / 2**30:g} GiB: "
                                 "not hashed; pass --check-hashes)")
    report.proven.append(headers)
    return report


def _plain(name: str) -> bool:
    """A plain file name inside the folder (never a path out of it)."""
    return bool(name) and name not in (".", "..") and Path(name).name == name


def _few(items: list[str], n: int = 5, sep: str = ", ") -> str:
    """At most ``n`` items and a count of the rest: error lines stay short whatever the input."""
    shown = sep.join(str(i) for i in items[:n])
    return shown + (f"{sep}and {len(items) - n} more" if len(items) > n else "")
