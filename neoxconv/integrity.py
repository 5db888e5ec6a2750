"""Check a merged folder before trusting it: manifest, sizes, hashes, safetensors headers vs config and index."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from neoxconv.checkpoint import model_layers
from neoxconv.config import NeoXConfig
from neoxconv.dtypes import FROM_SAFETENSORS
from neoxconv.errors import CheckpointError, VerificationError
from neoxconv.merge import RULES, expected_shape, hf_name
from neoxconv.hashing import hash_file, recorded_hash

MANIFEST = "neoxconv.json"
INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20


@dataclass
class IntegrityReport:
    manifest_found: bool
    files_checked: int = 0
    hashes_checked: bool = False
    total_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def expected_tensors(config: NeoXConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor a merged model of this config holds."""
    out: dict[str, tuple[int, ...]] = {}
    for layer in model_layers(config, with_readout=not config.tie_word_embeddings):
        for spec in RULES[layer.kind].values():
            name = hf_name(spec, layer)
            if name is not None:
                out[name] = expected_shape(spec, config)  # type: ignore[assignment]
    return out


def read_safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"header length {n} is implausible")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def load_config(out: Path) -> NeoXConfig:
    path = Path(out) / "config.json"
    if not path.is_file():  # an input problem (exit 4), not a failed check
        raise CheckpointError(f"{out}: no config.json, so not a folder written by 'neoxconv merge'; "
                              "pass the OUT folder of a merge")
    return NeoXConfig.from_hf_json(path)


def check_output(out: Path, config: NeoXConfig, *, hashes: bool | None = None,
                 hash_limit_bytes: int = 2 << 30) -> IntegrityReport:
    """Raise `VerificationError` naming every missing, resized, modified or malformed file.

    ``hashes=None`` checks hashes when the model is smaller than ``hash_limit_bytes``; each file's digest is
    checked under the algorithm its manifest entry names (BLAKE3, or sha256 for older manifests).
    """
    out = Path(out)
    problems: list[str] = []
    manifest = None
    if (out / MANIFEST).is_file():
        try:
            manifest = json.loads((out / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"{MANIFEST}: unreadable ({e})")
    report = IntegrityReport(manifest_found=manifest is not None)
    if not (out / INDEX).is_file():
        raise CheckpointError(f"{out}: no {INDEX}; not a finished merge output (re-run the merge to resume it)")
    try:
        weight_map: dict[str, str] = json.loads((out / INDEX).read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise VerificationError(f"{out / INDEX}: unreadable index ({e})") from None

    files: dict[str, dict] = {}
    if manifest is not None:
        files = dict(manifest.get("layers", {}))
        files.update({k: v for k, v in manifest.get("files", {}).items() if k != INDEX})
    else:
        report.notes.append(f"no {MANIFEST}: not written by neoxconv, sizes and hashes not checked")
    total = sum((out / f).stat().st_size for f in set(weight_map.values()) if (out / f).is_file())
    report.total_bytes = total
    do_hash = hashes if hashes is not None else total < hash_limit_bytes
    report.hashes_checked = bool(do_hash and manifest is not None)
    for name, entry in files.items():
        path = out / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if "size" in entry and size != entry["size"]:
            problems.append(f"{name}: size {size}, manifest says {entry['size']} (modified or truncated)")
            continue
        recorded = recorded_hash(entry)
        if do_hash and recorded is not None and hash_file(path, recorded[0]) != recorded[1]:
            problems.append(f"{name}: {recorded[0]} differs from the manifest (modified)")
        report.files_checked += 1

    expected = expected_tensors(config)
    seen: dict[str, str] = {}
    for file in sorted(set(weight_map.values())):
        path = out / file
        if not path.is_file():
            if file not in files:
                problems.append(f"{file}: missing (named by {INDEX})")
            continue
        try:
            header = read_safetensors_header(path)
        except (OSError, ValueError) as e:
            problems.append(f"{file}: not a valid safetensors file ({e})")
            continue
        for name, info in header.items():
            if name == "__metadata__":
                continue
            seen[name] = file
            if weight_map.get(name) != file:
                problems.append(f"{file}: holds {name!r}, which {INDEX} places in {weight_map.get(name)!r}")
            if name not in expected:
                problems.append(f"{file}: unexpected tensor {name!r} for this config")
                continue
            shape = tuple(info.get("shape", ()))
            if expected[name] is not None and shape != expected[name]:
                problems.append(f"{file}: {name!r} has shape {list(shape)}, config.json implies {list(expected[name])}")
            if info.get("dtype") not in FROM_SAFETENSORS or FROM_SAFETENSORS[info["dtype"]] not in (
                    "float16", "bfloat16", "float32"):
                problems.append(f"{file}: {name!r} has dtype {info.get('dtype')!r}")
    missing = sorted(set(expected) - set(seen))
    if missing:
        problems.append(f"tensors missing from the safetensors files: {', '.join(missing[:8])}"
                        + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if problems:
        raise VerificationError(f"{out}: the merged model does not match its manifest/config: " + "; ".join(problems))
    return report
