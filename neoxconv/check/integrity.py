"""Check a merged folder before trusting it: manifest, sizes, hashes, safetensors headers vs config and index."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from neoxconv.config import NeoXConfig
from neoxconv.dtypes import FROM_SAFETENSORS
from neoxconv.errors import CheckpointError, VerificationError, few
from neoxconv.merge import output_shapes
from neoxconv.output.folder import INDEX, JOURNAL, MANIFEST, competing_weight_files
from neoxconv.output.hashing import hash_file, recorded_hash
from neoxconv.progress import format_bytes
from neoxconv.smallfile import read_json
from neoxconv.source.checkpoint import model_layers
from neoxconv.source.hf_folder import plain_file_name, read_weight_map
from neoxconv.source.safetensors import layout_problems, read_header


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


def _hash_mismatch(path: Path, entry: dict) -> tuple[str, bool] | None:
    """(hash name, whether the file differs from the manifest's hash); None when it records no hash.

    The one place integrity hashes a file.
    """
    recorded = recorded_hash(entry)  # BLAKE3, or sha256 (--hash sha256, manifests from before BLAKE3)
    if recorded is None:
        return None
    return recorded[0], hash_file(path, recorded[0]) != recorded[1]


# weights below this are hashed by default (decimal, as every size neoxconv prints: 2 GB = 2e9 bytes)
HASH_LIMIT_BYTES = 2 * 10**9


def check_output(out: Path, config: NeoXConfig, *, hashes: bool | None = None,
                 hash_limit_bytes: int = HASH_LIMIT_BYTES, require_manifest: bool = True) -> IntegrityReport:
    """Raise `VerificationError` naming every missing, resized, modified or malformed file.

    With the manifest (``neoxconv.json``): every file it lists is present with its recorded size; the small
    files (config.json, generation_config.json, the index, tokenizer files) are always hashed (the model card,
    README.md, is the user's to edit: not checked); the weight files are hashed when
    ``hashes`` is True, or when it is None and the weights total less than ``hash_limit_bytes``.
    Without it, the folder fails unless ``require_manifest=False`` (``verify --no-manifest``), and then only
    the headers are checked. Either way every safetensors header must agree with config.json and the index.
    """
    out = Path(out)
    problems: list[str] = []
    manifest = None
    if (out / MANIFEST).is_file():
        try:
            manifest = read_json(out / MANIFEST, VerificationError, what="manifest")
        except VerificationError as e:
            problems.append(f"{MANIFEST}: unreadable ({e})")
        else:
            if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), dict) \
                    or not isinstance(manifest.get("files"), dict):
                problems.append(f"{MANIFEST}: not a neoxconv manifest (no 'layers' and 'files' tables)")
                manifest = None
    report = IntegrityReport(manifest_found=manifest is not None)
    if not (out / INDEX).is_file():
        raise CheckpointError(f"{out}: no {INDEX}; not a finished merge output (re-run the merge to resume it)")
    weight_map = read_weight_map(out / INDEX, VerificationError)

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
    total = sum((out / f).stat().st_size for f in index_files if plain_file_name(f) and (out / f).is_file())
    report.total_bytes = total
    hash_weights = hashes if hashes is not None else total < hash_limit_bytes
    for entries, do_hash in ((weights, hash_weights), (small, True)):  # small files: always hashed
        for name, entry in entries.items():
            path = out / name
            if not plain_file_name(name) or not isinstance(entry, dict):
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
        added = sorted(p.name for p in out.iterdir() if p.name not in small and _read_by_loaders(p.name))
        if added:  # e.g. copied in after a merge without a tokenizer: verify and transformers use it, unchecked
            report.not_proven.append(f"{', '.join(added)}: not in the manifest (added after the merge), not checked")
        user_files = manifest.get("user_files") if isinstance(manifest.get("user_files"), dict) else {}
        for name in sorted(n for n in user_files if plain_file_name(str(n)) and (out / str(n)).is_file()):
            # the model card: the user's to edit (license, intended use); neither weights, config nor tokenizer
            report.notes.append(f"{name}: the model card, yours to edit; not checked")
        unlisted = [f for f in index_files if f not in weights]
        if unlisted:
            problems.append(f"{INDEX}: names {few(unlisted)}, which the manifest does not list (added file?)")
    report.hashes_checked = manifest is not None and bool(hash_weights)
    competing = competing_weight_files(out, index_files)
    if competing:  # from_pretrained(OUT) would load model.safetensors, not what the index and manifest prove
        problems.append(f"{few(competing)}: weight files beside {INDEX} that the merge did not write and "
                        "transformers' from_pretrained may load instead of the indexed ones; remove them")

    expected = expected_tensors(config)
    seen: dict[str, str] = {}
    read: set[str] = set()  # files whose header was read
    for file in index_files:
        path = out / file
        if not plain_file_name(file):
            problems.append(f"{INDEX}: names {file!r:.80}, which is not a file in this folder")
            continue
        if not path.is_file():
            if file not in weights:
                problems.append(f"{file}: missing (named by {INDEX})")
            continue
        try:
            header, data_len = read_header(path)
        except (OSError, ValueError, RecursionError) as e:
            problems.append(f"{file}: not a valid safetensors file ({e})")
            continue
        problems += layout_problems(file, header, data_len)
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
    phantom = sorted(f"{name!r:.80} (in {file})" for name, file in weight_map.items()
                     if file in read and name not in seen)
    if phantom:
        problems.append(f"{INDEX}: places tensors in files that do not hold them: {few(phantom)}")
    missing = sorted(set(expected) - set(seen))
    if missing:
        problems.append(f"tensors missing from the safetensors files: {few(missing, n=8)}")
    if problems:
        raise VerificationError(f"{out}: the merged model does not match its manifest/config: "
                                + few(problems, n=12, sep="; "))

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
        report.not_proven.append(f"the {len(weights)} weight files' contents (over {format_bytes(hash_limit_bytes)}: "
                                 "not hashed; pass --check-hashes)")
    report.proven.append(headers)
    return report


_LOADER_FILES = ("generation_config.json", "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json")


def _read_by_loaders(name: str) -> bool:
    """A file transformers or verify reads when it loads OUT (config and tokenizer files)."""
    return name in _LOADER_FILES or (name.startswith("tokenizer") and name.endswith(".json"))


