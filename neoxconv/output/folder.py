"""The output-folder protocol of every writer (`merge`, `split`, `reshard`): one module, one manifest.

A run holds OUT through an `OutputFolder`:

* **where**: OUT is a folder or does not exist yet (a file, a dangling symlink or an unwritable place is an
  `OutputError`, exit 6, naming OUT). Every folder neoxconv writes into under OUT is a real folder (never a
  symlink); every file is created through a hidden temporary opened with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (a
  leftover of that name, link or file, is removed, never followed) and renamed into place
  (`neoxconv.output.writer`). Nothing is written or deleted through a link or outside OUT.
* **lock**: `OutputLock` holds ``fcntl.flock`` on ``OUT/.neoxconv.lock`` (recording the holder's pid and
  command) for the whole run; a second run into the same OUT is refused with that pid.
* **ownership before deletion**: a folder without this kind's journal or manifest is someone else's: refused
  unless ``--force``, and then nothing in it is deleted. Only names the writer's ``is_ours`` accepts (and their
  hidden temporaries) are ever removed, and with ``--force`` over another output only those its manifest lists:
  a user's ``notes.txt`` or ``.notes.neoxconv-tmp`` is never touched, whatever a manifest claims.
* **journal and manifest**: one typed `Manifest` (``neoxconv.json``; the journal ``.neoxconv-journal.json``
  while a run is under way) with a `FileEntry` per output file: size, hash, the fingerprint of exactly what
  the file was made from, and what it was allowed under (non-finite values, replica divergence). The
  manifest is written last, and removed as soon as a run is about to change a file, so it only ever stands
  beside a complete output. Manifests of the previous version (``neoxconv.json`` of a merge, format 1;
  ``neoxconv-neox.json`` of split/reshard, format 2) are still read: such a folder resumes and verifies.
* **resume**: a file is kept only when its fingerprint (source bytes, config, everything that decided its
  bytes) is unchanged, it is present with its recorded size and hash, and the options of this run allow it
  (`OutputFolder.reusable`); otherwise it is redone.
* **hash policy**: every file is hashed while it is written (BLAKE3 by default, ``sha256`` on request), never
  re-read after writing; a resume re-hashes a file it keeps.
* **disk check**: before the first byte, the bytes still to write must fit.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from neoxconv import __version__
from neoxconv.errors import OutputError
from neoxconv.output.hashing import HASH_ALGORITHMS, hash_bytes, hash_file, recorded_hash
from neoxconv.output.writer import TMP_SUFFIX, OutFile, atomic_write, atomic_write_json, open_folder
from neoxconv.smallfile import read_json

log = logging.getLogger(__name__)

MANIFEST = "neoxconv.json"  # what a finished output holds (every writer)
JOURNAL = ".neoxconv-journal.json"  # a run in progress or interrupted
INDEX = "model.safetensors.index.json"  # merge's Hugging Face weight index
LOCK = ".neoxconv.lock"
LEGACY_MANIFESTS = {"neox": ("neoxconv-neox.json",)}  # names written by earlier versions, still read
FORMAT = 3  # 3: one manifest for every writer (kind, layers, files; per-file fingerprint and allowances)
HF, NEOX = "hf", "neox"  # the kinds of output: a Hugging Face folder (merge), a gpt-neox checkpoint

_WEIGHT_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# README.md (the model card) is not one of them: once written it is the user's, never deleted (`hand_over`)
_FIXED_NAMES = frozenset({"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                          "tokenizer.model", "vocab.json", "merges.txt", INDEX, MANIFEST, JOURNAL})


def is_output_name(name: str) -> bool:
    """A file name neoxconv's merge writes and may replace or remove (weights, config, generation config, tokenizer
    files, index, manifest, journal)."""
    return name in _FIXED_NAMES or bool(_WEIGHT_FILE.match(name))


def competing_weight_files(out: Path, indexed: Iterable[str]) -> list[str]:
    """Weight files in OUT that transformers' ``from_pretrained(OUT)`` may load instead of, or beside, the
    safetensors index naming ``indexed``: ``model.safetensors`` (looked for before the index), ``pytorch_model*.bin``
    and their index, any ``*.safetensors`` the index does not name. A merge never writes them."""
    indexed = set(indexed)
    return sorted(p.name for p in _entries(out)
                  if p.name == "model.safetensors" or (p.name.endswith(".safetensors") and p.name not in indexed)
                  or (p.name.startswith("pytorch_model") and p.name.endswith((".bin", ".bin.index.json"))))


def is_temp_name(name: str, is_ours: Callable[[str], bool] = is_output_name, folder: str = "") -> bool:
    """The hidden temporary of one of neoxconv's own output names (``.config.json.neoxconv-tmp``).

    ``folder`` is the temporary's folder relative to OUT (``configs/``), for names ``is_ours`` tests as paths.
    """
    return name.startswith(".") and name.endswith(TMP_SUFFIX) and is_ours(folder + name[1 : -len(TMP_SUFFIX)])


# ----- paths ------------------------------------------------------------------------------------------------
def check_out_path(out: Path) -> None:
    """OUT is a folder or does not exist yet (checked before any work, creates nothing)."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{out}: OUT is a dangling symlink (to {os.readlink(out)}); "
                          "create its target folder or choose another OUT")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: OUT is a file, not a folder; choose a folder (it is created if missing)")


def make_out_dir(out: Path) -> None:
    check_out_path(out)
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output folder: {e.strerror or e}") from None


def _parts(rel: str) -> list[str] | None:
    """The parts of ``rel`` when it is a plain relative path (no ``..``, ``.``, empty part or backslash, nothing
    absolute); None otherwise. Only such paths are written or deleted under OUT."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
        return None
    return parts


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class OutDir:
    """OUT and the folders under it, held open for a run: every create, rename, unlink and fsync under OUT is
    relative to these descriptors.

    OUT is opened once (a link the user gave as OUT is followed: they named it). A folder under it is opened part
    by part from OUT's descriptor with ``O_DIRECTORY|O_NOFOLLOW`` (made first where missing; a link or a file there
    is an `OutputError`, never followed), checked by that open and held until `close`. The writers get an
    `OutFile` (a held descriptor and a name). A folder swapped for a link, or renamed away, after it was opened
    changes nothing: writes land in the folder that was checked, never through the new link; `check_in_place`
    refuses to go on (before a manifest claims a complete OUT) once a held folder no longer stands at its path.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._fds: dict[str, int] = {}  # "" (OUT) or a relative folder -> its descriptor

    def __enter__(self) -> OutDir:
        try:
            self._fds[""] = open_folder(self.out)
        except OSError as e:
            raise OutputError(f"{self.out}: cannot open the output folder: {e.strerror or e}") from None
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    @property
    def fd(self) -> int:
        """OUT's descriptor."""
        return self._fds[""]

    def folder(self, rel: str, *, create: bool = False) -> int | None:
        """The descriptor of the folder ``OUT/rel`` (``""``: OUT), opened part by part, never through a link;
        None when a part is missing (``create``: made instead). An `OutputError` when ``rel`` is not a plain
        relative path, or a part of it is a link or not a folder."""
        if rel in self._fds:
            return self._fds[rel]
        parts = _parts(rel)
        if parts is None:
            raise OutputError(f"{self.out / rel}: not a path neoxconv writes inside OUT")
        parent = self.folder("/".join(parts[:-1]), create=create)
        if parent is None:
            return None
        path, name = self.out / rel, parts[-1]
        if create:
            try:
                os.mkdir(name, dir_fd=parent)  # does not follow a link: a planted one is EEXIST, then refused
            except FileExistsError:
                pass
            except OSError as e:
                raise OutputError(f"{path}: cannot create the folder: {e.strerror or e}") from None
        try:
            fd = os.open(name, _FOLDER_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if create:
                raise OutputError(f"{path}: cannot create the folder: removed as it was made") from None
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                st = _lstat_at(parent, name)
                what = "a symlink" if st is not None and stat.S_ISLNK(st.st_mode) else "not a folder"
                raise OutputError(f"{path}: is {what}; neoxconv writes its own folder there: remove it or choose "
                                  "another OUT") from None
            raise OutputError(f"{path}: cannot open the folder: {e.strerror or e}") from None
        self._fds[rel] = fd
        return fd

    def _find(self, rel: str) -> int | None:
        """`folder` for cleaning up: None, not an error, for anything but a real folder."""
        try:
            return self.folder(rel)
        except OutputError:
            return None

    def _at(self, rel: str) -> tuple[int, str] | None:
        """(its folder's descriptor, its name) for ``OUT/rel`` when its folders are real folders inside OUT."""
        parts = _parts(rel)
        if parts is None:
            return None
        d = self._find("/".join(parts[:-1]))
        return None if d is None else (d, parts[-1])

    def file(self, rel: str) -> OutFile:
        """Where ``rel`` is written: its folders opened (made where missing) as `folder` opens them."""
        parts = _parts(rel)
        if parts is None:
            raise OutputError(f"{self.out / rel}: not a path neoxconv writes inside OUT")
        d = self.folder("/".join(parts[:-1]), create=True)
        st = _lstat_at(d, parts[-1])
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{self.out / rel}: is a folder where neoxconv writes a file; remove it or choose "
                              "another OUT")
        return OutFile(self.out / rel, d)

    def lstat(self, rel: str) -> os.stat_result | None:
        """``OUT/rel`` itself (a link is not followed); None when it, or a real folder holding it, is missing."""
        at = self._at(rel)
        return None if at is None else _lstat_at(*at)

    def is_file(self, rel: str) -> bool:
        """``OUT/rel`` is a regular file (not a link) in real folders inside OUT."""
        st = self.lstat(rel)
        return st is not None and stat.S_ISREG(st.st_mode)

    def is_folder(self, rel: str) -> bool:
        return self._find(rel) is not None

    def listdir(self, rel: str = "") -> list[str]:
        """The names in ``OUT/rel`` ([] when it is not a real folder inside OUT)."""
        d = self.fd if not rel else self._find(rel)
        if d is None:
            return []
        try:
            return os.listdir(d)
        except OSError as e:
            where = f"{self.out / rel}: cannot list the folder" if rel else f"{self.out}: cannot list the output folder"
            raise OutputError(f"{where}: {e.strerror or e}") from None

    def open_read(self, rel: str) -> BinaryIO | None:
        """``OUT/rel`` opened for reading when it is a regular file (never through a link); None otherwise."""
        at = self._at(rel)
        if at is None:
            return None
        try:
            fd = os.open(at[1], os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=at[0])
        except OSError:
            return None
        f = open(fd, "rb", buffering=0)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            return None
        return f

    def remove(self, rel: str) -> None:
        """Remove ``OUT/rel`` (a link itself, never its target; gone already is fine); anything else that fails is
        an `OutputError` naming it."""
        at = self._at(rel)
        if at is None:
            return
        try:
            os.unlink(at[1], dir_fd=at[0])
        except FileNotFoundError:
            pass
        except OSError as e:
            raise OutputError(f"{self.out / rel}: cannot remove: {e.strerror or e}") from None

    def rmdir(self, rel: str) -> None:
        """Remove the folder ``OUT/rel`` when it is empty and still the one held (quietly otherwise)."""
        at, fd = self._at(rel), self._find(rel)
        if at is None or fd is None:
            return
        st = _lstat_at(*at)
        if st is None or (st.st_dev, st.st_ino) != _identity(fd):
            return
        for held in [r for r in self._fds if r == rel or r.startswith(rel + "/")]:
            os.close(self._fds.pop(held))
        try:
            os.rmdir(at[1], dir_fd=at[0])
        except OSError:
            pass

    def check_in_place(self) -> None:
        """Every held folder still stands at its path: OUT at the path the user gave, each folder under it in its
        parent. An `OutputError` otherwise (another process moved it or put something else there): what was
        written is in the folder that was checked, not at that path, and no manifest may say otherwise."""
        for rel, fd in list(self._fds.items()):
            if not rel:
                try:
                    here = os.stat(self.out)
                    st: tuple[int, int] | None = (here.st_dev, here.st_ino)
                except OSError:
                    st = None
            else:
                parts = rel.split("/")
                parent = self._fds.get("/".join(parts[:-1]))
                found = None if parent is None else _lstat_at(parent, parts[-1])
                st = None if found is None else (found.st_dev, found.st_ino)
            if st != _identity(fd):
                raise OutputError(
                    f"{self.out / rel if rel else self.out}: was replaced by another process while neoxconv wrote "
                    "into it (moved away, or a link or another folder put in its place); nothing was written through "
                    "the new entry: make sure no other process changes OUT, then re-run")


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def foreign_entries(dirs: OutDir, is_ours: Callable[[str], bool] = is_output_name) -> list[str]:
    """Entries of OUT that are not neoxconv's lock or temporaries (what makes a folder someone else's)."""
    return sorted(n for n in dirs.listdir() if n != LOCK and not is_temp_name(n, is_ours))


def remove_stale_temps(dirs: OutDir, is_ours: Callable[[str], bool] = is_output_name, folder: str = "") -> None:
    """Our own temporaries from an interrupted run (only called once OUT is known to be ours).

    ``folder``: a subfolder of OUT (``global_step0/``); nothing is removed unless it is a real folder inside OUT.
    """
    for name in dirs.listdir(folder.rstrip("/")):
        if is_temp_name(name, is_ours, folder) and dirs.is_file(folder + name):
            dirs.remove(folder + name)


def remove_previous_output(dirs: OutDir, listed: Iterable[str],
                           is_ours: Callable[[str], bool] = is_output_name) -> list[str]:
    """--force over another neoxconv output: remove what its manifest lists AND neoxconv writes. Returns them."""
    removed = []
    for name in dict.fromkeys(map(str, listed)):
        if is_ours(name) and dirs.is_file(name):
            dirs.remove(name)
            removed.append(name)
    remove_stale_temps(dirs, is_ours)
    return removed


def _entries(out: Path) -> list[Path]:
    try:
        return list(Path(out).iterdir())
    except OSError as e:
        raise OutputError(f"{out}: cannot list the output folder: {e.strerror or e}") from None


# ----- the typed manifest -------------------------------------------------------------------------------------
@dataclass
class FileEntry:
    """One output file: its size and hash, what it was made from, and what it was allowed under."""

    size: int
    algo: str  # blake3 | sha256
    digest: str
    fingerprint: Any = None  # JSON: the proof of the inputs that decided its bytes (None: small files)
    nonfinite: int = 0  # inf/nan values written (only with --allow-nonfinite)
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # the writer's own description (merge: tensors, rules)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.algo: self.digest, "size": self.size, **self.meta}
        if self.fingerprint is not None:
            out["source_fingerprint"] = self.fingerprint
        if self.nonfinite:
            out["nonfinite"] = self.nonfinite
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out

    @classmethod
    def from_json(cls, raw: Any) -> FileEntry | None:
        """An entry as any version wrote it; None when it is not one (no size or no hash)."""
        if not isinstance(raw, dict) or type(raw.get("size")) is not int:
            return None
        recorded = recorded_hash(raw)
        if recorded is None:
            return None
        nonfinite = raw.get("nonfinite", 0)
        warnings = raw.get("warnings", [])
        skip = {*HASH_ALGORITHMS, "size", "source_fingerprint", "nonfinite", "warnings"}
        return cls(size=raw["size"], algo=recorded[0], digest=recorded[1], fingerprint=raw.get("source_fingerprint"),
                   nonfinite=nonfinite if type(nonfinite) is int else 1,
                   warnings=[str(w) for w in warnings] if isinstance(warnings, list) else [],
                   meta={k: v for k, v in raw.items() if k not in skip})

    def matches(self, dirs: OutDir, rel: str) -> bool:
        """``OUT/rel`` is a regular file with this size and hash (re-hashed: it is an older file)."""
        f = dirs.open_read(rel)
        if f is None:
            return False
        with f:
            return os.fstat(f.fileno()).st_size == self.size and hash_file(f.fileno(), self.algo) == self.digest


@dataclass
class Manifest:
    """``neoxconv.json`` (and the journal): which source, which options, every file written."""

    kind: str  # HF | NEOX
    source: dict[str, Any]
    options: dict[str, Any]
    hash: str
    layers: dict[str, FileEntry] = field(default_factory=dict)  # the big files, each made from source layers
    files: dict[str, FileEntry] = field(default_factory=dict)  # the small files written last
    info: dict[str, Any] = field(default_factory=dict)  # config, tokenizer, warnings, ...: for people and verify
    # files written for the user to edit (the model card): the entry is what neoxconv wrote last; verify does not
    # check them, a re-run keeps one that differs from it (`OutputFolder.hand_over`), --force never deletes them
    user_files: dict[str, FileEntry] = field(default_factory=dict)
    version: str = __version__
    format: int = FORMAT
    listed: list[str] = field(default_factory=list)  # every name a read manifest lists, well-formed entry or not

    def to_json(self) -> dict[str, Any]:
        user = {"user_files": {n: e.to_json() for n, e in self.user_files.items()}} if self.user_files else {}
        return {"tool": "neoxconv", "kind": self.kind, "version": self.version, "format": self.format,
                "source": self.source, "options": self.options, "hash": self.hash,
                "layers": {n: e.to_json() for n, e in self.layers.items()},
                "files": {n: e.to_json() for n, e in self.files.items()}, **user, **self.info}

    @classmethod
    def from_json(cls, raw: Any, kind: str) -> Manifest | None:
        """A manifest or journal of ``kind`` as any version wrote it; None when it is not one."""
        if not isinstance(raw, dict) or raw.get("tool") != "neoxconv" or raw.get("kind", HF) != kind:
            return None
        fmt = raw.get("format")
        fmt = fmt if type(fmt) is int else 0
        source = raw.get("source") if isinstance(raw.get("source"), dict) else {}
        options = raw.get("options") if isinstance(raw.get("options"), dict) else {}
        layers, files = _entries_of(raw.get("layers")), _entries_of(raw.get("files"))
        if kind == NEOX and fmt < FORMAT:  # format 2 kept every file in "files": the rank files are layers
            layers = {n: e for n, e in files.items() if n.startswith("global_step")}
            files = {n: e for n, e in files.items() if n not in layers}
        known = {"tool", "kind", "version", "format", "source", "options", "hash", "layers", "files", "user_files"}
        listed = [str(n) for section in ("layers", "files") if isinstance(raw.get(section), dict) for n in raw[section]]
        return cls(kind=kind, source=source, options=options, hash=str(raw.get("hash", "sha256")), layers=layers,
                   files=files, info={k: v for k, v in raw.items() if k not in known}, version=str(raw.get("version")),
                   format=fmt, listed=listed, user_files=_entries_of(raw.get("user_files")))

    @property
    def entries(self) -> dict[str, FileEntry]:
        return {**self.layers, **self.files}

    def same_source(self, source: dict[str, Any]) -> bool:
        """Same source (folder, layout, TP degree, file names); what changed inside is found per file.

        Older formats: a merge manifest that listed files as {name, size} is compared by name; a split/reshard
        manifest before format 2 by its folder (their files carry no fingerprint: all are redone).
        """
        recorded = self.source
        if self.kind == NEOX and self.format < 2:
            if "step_dir" in recorded:  # reshard
                return _same_place(recorded.get("step_dir"), source.get("step_dir"))
            files = recorded.get("files") if isinstance(recorded.get("files"), list) else []
            folders = {str(Path(str(f.get("path"))).parent) for f in files if isinstance(f, dict)}
            return len(folders) == 1 and _same_place(folders.pop(), source.get("hf_dir"))
        files = recorded.get("files")
        if isinstance(files, list):
            recorded = {**recorded, "files": [f.get("name") if isinstance(f, dict) else f for f in files]}
        return all(_same_place(recorded.get(k), v) if k in PLACE_KEYS else recorded.get(k) == v
                   for k, v in source.items())

    def describe_differences(self, source: dict[str, Any], options: dict[str, Any]) -> list[str]:
        """What differs between this recorded run and another, as 'what: before, now' phrases."""
        before_src, diffs = self.source, []
        for key in source:
            if key != "files" and before_src.get(key) != source.get(key):
                diffs.append(f"source {key.replace('_', ' ')}: {before_src.get(key)} before, {source.get(key)} now")
        if not diffs and before_src.get("files") != source.get("files"):  # names (changed contents: per file)
            listed = before_src.get("files") if isinstance(before_src.get("files"), list) else []
            before_files = {str(f.get("name") if isinstance(f, dict) else f) for f in listed}
            changed = sorted(before_files ^ {str(f) for f in source.get("files", [])})
            diffs.append(f"source files changed since that run ({', '.join(changed[:3])}"
                         + (f" and {len(changed) - 3} more" if len(changed) > 3 else "") + ")")
        for key in sorted(self.options.keys() | options.keys()):
            before = self.options.get(key)
            if before != options.get(key):
                if key == "dtype" and before == "auto":  # say what auto wrote
                    written = {m.get("dtype") for e in self.layers.values()
                               for m in (e.meta.get("tensors") or {}).values() if isinstance(m, dict)}
                    before = f"auto ({written.pop()})" if len(written) == 1 else before
                diffs.append(f"{key.replace('_', '-')}: {before} before, {options.get(key)} now")
        return diffs or ["its manifest does not match this run"]


PLACE_KEYS = ("step_dir", "hf_dir")  # where the source is: public (a name, or a path inside OUT), never absolute


def _same_place(recorded: Any, now: Any) -> bool:
    """The recorded source folder is this run's. Earlier manifests recorded it absolute (a private path,
    no longer written): such a record is compared by the folder's name, as the current ones are; the
    per-file fingerprints prove the rest (a different checkpoint is redone, never kept)."""
    if not isinstance(recorded, str) or not isinstance(now, str):
        return recorded == now
    if recorded.startswith("/"):
        return Path(recorded).name == Path(now).name
    return recorded == now


def _entries_of(raw: Any) -> dict[str, FileEntry]:
    if not isinstance(raw, dict):
        return {}
    entries = {str(name): FileEntry.from_json(e) for name, e in raw.items()}
    return {name: e for name, e in entries.items() if e is not None}


def load_state(out: Path, kind: str) -> Manifest | None:
    """The journal or manifest of ``kind`` in OUT (the journal first; then this version's manifest name, then
    the names earlier versions wrote). A symlink, unreadable bytes or JSON that is not neoxconv's count as no
    state: OUT is then someone else's."""
    for name in (JOURNAL, MANIFEST, *LEGACY_MANIFESTS.get(kind, ())):
        p = Path(out) / name
        if p.is_file() and not p.is_symlink():
            try:
                raw = read_json(p, OutputError)
            except OutputError:
                continue
            state = Manifest.from_json(raw, kind)
            if state is not None:
                return state
    return None


# ----- one run ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FolderSpec:
    """What a writer writes: its kind of output, its command, which relative paths are its own."""

    kind: str  # HF | NEOX
    command: str  # merge | split | reshard: in the lock file and the messages
    is_ours: Callable[[str], bool]  # paths relative to OUT that this writer writes
    noun: str = "output"  # what the refusal of a foreign folder calls this writer's output
    folders: tuple[str, ...] = ()  # subfolders it writes into (real folders, created when needed)
    stale_folders: Callable[[Path], list[str]] = lambda out: []  # folders of earlier runs that may hold temporaries


class OutputFolder:
    """One run's hold on OUT: lock, previous state, reuse decisions, journal, manifest (see the module doc).

    ::

        with OutputFolder(out, spec, source=..., options=..., hash_algo=..., resume=..., force=...) as folder:
            entry = folder.reusable(name, fingerprint, allowed) # per file, before writing anything
            folder.keep({name: entry})                          # when it may be kept
            folder.begin(names, {name: bytes}, need_bytes)      # disk check, manifest out, journal in
            where = folder.file(name); ...write...; folder.record({name: entry})
            folder.finish(info)                                 # small files, manifest, no journal
    """

    def __init__(self, out: Path, spec: FolderSpec, *, source: dict[str, Any], options: dict[str, Any],
                 hash_algo: str, resume: bool = True, force: bool = False) -> None:
        self.out = Path(out)
        self.spec = spec
        self.resume, self.force = resume, force
        self.state = Manifest(kind=spec.kind, source=source, options=options, hash=hash_algo)
        self.previous: dict[str, FileEntry] = {}
        self.ours = False  # OUT held this kind's journal or manifest: our own temporaries may be removed
        self._small: dict[str, bytes] = {}
        self._layer_names: list[str] = []
        self._lock: OutputLock | None = None
        self.dirs = OutDir(self.out)  # OUT and its folders, held open while the run holds OUT

    @property
    def hash(self) -> str:
        return self.state.hash

    def __enter__(self) -> OutputFolder:
        make_out_dir(self.out)
        self.dirs.__enter__()
        try:
            self._lock = OutputLock(self.out, self.spec.command, dir_fd=self.dirs.fd)
            self._lock.__enter__()
        except BaseException:
            self._lock = None
            self.dirs.close()
            raise
        try:
            previous = load_state(self.out, self.spec.kind)
            self.ours = previous is not None
            self.previous = self._prepare(previous)
            if previous is not None:  # what neoxconv wrote last for the user, whatever this run redoes
                self.state.user_files = dict(previous.user_files)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        lock, self._lock = self._lock, None
        try:
            if lock is not None:
                lock.__exit__(exc_type, exc, tb)
        finally:
            self.dirs.close()

    def _ours(self, rel: str) -> bool:
        return rel in (MANIFEST, JOURNAL, *LEGACY_MANIFESTS.get(self.spec.kind, ())) or self.spec.is_ours(rel)

    def _check_folders(self) -> None:
        """Each folder this writer writes into is a real folder or absent; opened (and held) now when present."""
        for rel in self.spec.folders:
            self.dirs.folder(rel)

    def _prepare(self, state: Manifest | None) -> dict[str, FileEntry]:
        """Decide whether OUT is ours before deleting anything; return the entries that may be reused.

        Deletes only our own temporaries (once OUT is known to be ours) and, with --force (or --no-resume on
        the same source) over another neoxconv output, only the files its manifest lists that are ours.
        """
        out, ours = self.out, self._ours
        if state is None:
            foreign = foreign_entries(self.dirs, ours)
            if foreign and not self.force:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise OutputError(
                    f"{out}: the folder is not empty ({shown}) and is not a neoxconv {self.spec.noun}; choose an "
                    "empty folder or pass --force (neoxconv only overwrites the files it writes)")
            self._check_folders()
            return {}  # nothing deleted: a foreign folder's files, even ones named like ours, are not ours
        self._check_folders()
        source, options = self.state.source, self.state.options
        same_source = state.same_source(source)
        same = same_source and state.options == options
        if not same and state.listed:
            if not (self.force or (same_source and not self.resume)):
                what, fix = (("made with other options", "use --no-resume or another OUT") if same_source else
                             ("of a different source", "use another OUT, or --force to replace it"))
                command = state.options.get("command", "merge")
                raise OutputError(f"{out}: holds a neoxconv {command} {what}: "
                                  f"{'; '.join(state.describe_differences(source, options))}; {fix}")
        if not same:
            remove_previous_output(self.dirs,
                                   [*state.listed, MANIFEST, JOURNAL, *LEGACY_MANIFESTS.get(self.spec.kind, ())], ours)
        self._remove_stale()
        if not same:
            self._remove_empty_folders()
        if not same or not self.resume or (self.spec.kind == NEOX and state.format < 2):
            return {}  # an older format's files carry no fingerprint: all redone
        return state.entries

    def _remove_stale(self) -> None:
        remove_stale_temps(self.dirs, self._ours)
        for rel in dict.fromkeys([*self.spec.folders, *self.spec.stale_folders(self.out)]):
            remove_stale_temps(self.dirs, self._ours, f"{rel}/")

    def _remove_empty_folders(self) -> None:
        for rel in dict.fromkeys([*self.spec.stale_folders(self.out), *self.spec.folders]):
            self.dirs.rmdir(rel)  # only when empty

    # ----- reuse ----------------------------------------------------------------------------------------------
    def reusable(self, name: str, fingerprint: Any, allowed: Callable[[FileEntry], bool] = lambda e: True
                 ) -> FileEntry | None:
        """The previous run's entry for ``name`` when the file may be kept: made from the same inputs
        (``fingerprint``), allowed under this run's options, present with its recorded size and hash. Returned
        with this run's hash (re-hashed when it recorded another). `keep` it to record it."""
        entry = self.previous.get(name)
        if entry is None or entry.fingerprint != fingerprint or not allowed(entry) \
                or not entry.matches(self.dirs, name):
            return None
        if entry.algo != self.hash:  # the hash this run records (the file was just proven intact)
            f = self.dirs.open_read(name)
            if f is None:
                return None
            with f:
                entry = dataclasses.replace(entry, algo=self.hash, digest=hash_file(f.fileno(), self.hash))
        return entry

    def keep(self, entries: dict[str, FileEntry]) -> None:
        """Files of the previous run this run keeps as they are."""
        self.state.layers.update(entries)

    def resumable_bytes(self, name: str, fingerprint: Any) -> int:
        """Bytes `reusable` would re-hash for ``name`` (0 when nothing of it can be kept): for a progress bar."""
        entry = self.previous.get(name)
        return entry.size if entry is not None and entry.fingerprint == fingerprint else 0

    # ----- writing --------------------------------------------------------------------------------------------
    def file(self, rel: str) -> OutFile:
        """Where ``rel`` is written: its name in its folder, held open (made a real folder inside OUT where
        missing, never opened through a link: `OutDir`). A held folder that no longer stands at its path stops
        the run here (`OutDir.check_in_place`)."""
        self.dirs.check_in_place()
        return self.dirs.file(rel)

    def begin(self, layers: list[str], small: dict[str, bytes], need_bytes: int) -> None:
        """Before the first byte. ``layers``: the big files this run ends with, in order (those not reused are
        about to be written); ``small``: name -> bytes of the small files it writes last (one already holding
        them as recorded is kept). Checks the disk, takes the old manifest out if anything will change, writes
        the journal."""
        self._layer_names = list(layers)
        self._small = dict(small)
        changing = any(n not in self.state.layers for n in self._layer_names)
        for name, data in self._small.items():
            entry = self.previous.get(name)
            if entry is not None and entry.fingerprint is None \
                    and entry.digest == hash_bytes(data, entry.algo) and entry.matches(self.dirs, name):
                self.state.files[name] = FileEntry(size=len(data), algo=self.hash, digest=hash_bytes(data, self.hash))
            else:
                changing = True
        if changing:
            free = shutil.disk_usage(self.out).free  # (a read: by path)
            if need_bytes > free:
                raise OutputError(f"{self.out}: needs {need_bytes / 1e9:.2f} GB for the output but only "
                                  f"{free / 1e9:.2f} GB is free")
            self.dirs.remove(MANIFEST)  # the manifest only exists beside a complete output
            self._remove_legacy_manifests()
        # a no-op re-run changes no file and keeps the old manifest until the new one replaces it (a Ctrl-C
        # never leaves none)
        self.save_journal()

    def record(self, entries: dict[str, FileEntry]) -> None:
        """Files finished (written, fsynced, renamed): into the journal, so a crash from here on keeps them."""
        self.state.layers.update(entries)
        self.save_journal()

    def save_journal(self) -> None:
        atomic_write_json(self.file(JOURNAL), self.state.to_json())

    def _remove_legacy_manifests(self) -> None:
        for legacy in LEGACY_MANIFESTS.get(self.spec.kind, ()):
            if self.dirs.is_file(legacy):
                self.dirs.remove(legacy)

    def hand_over(self, files: dict[str, bytes]) -> list[str]:
        """Write files that become the user's to edit (the model card).

        A file is written when it is absent, or still holds what neoxconv wrote last (its recorded entry). One
        that differs (the user edited it), is not a regular file, or was never written by neoxconv (a foreign
        README.md under --force) is kept. The entry records what neoxconv wrote (into the journal at once).
        Returns the names kept although what neoxconv would write for them changed since it last wrote them.
        """
        outdated = []
        for name, data in files.items():
            where = self.file(name)
            new = FileEntry(size=len(data), algo=self.hash, digest=hash_bytes(data, self.hash))
            recorded = self.state.user_files.get(name)
            if new.matches(self.dirs, name):
                self.state.user_files[name] = new
            elif self.dirs.lstat(name) is None or (recorded is not None and recorded.matches(self.dirs, name)):
                atomic_write(where, data, hash_algo=self.hash)
                self.state.user_files[name] = new
            elif recorded is None or hash_bytes(data, recorded.algo) != recorded.digest:
                outdated.append(name)  # kept, though what neoxconv writes for it has changed since
        self.save_journal()
        return outdated

    def finish(self, info: dict[str, Any]) -> Manifest:
        """The small files (unless kept), then the manifest (last), then no journal."""
        self.state.layers = {n: self.state.layers[n] for n in self._layer_names}
        for name, data in self._small.items():
            if name not in self.state.files:
                digest = atomic_write(self.file(name), data, hash_algo=self.hash)
                self.state.files[name] = FileEntry(size=len(data), algo=self.hash, digest=digest)
        self.state.files = {n: self.state.files[n] for n in self._small}
        # what the last run wrote and this one does not (e.g. --no-tokenizer) goes, if it still holds what was
        # written (a file the user edited since is theirs, as an edited model card is: `hand_over`)
        for name, entry in self.previous.items():
            if name not in {**self.state.files, **self.state.layers, **self.state.user_files} and self._ours(name) \
                    and self.dirs.is_file(name) and entry.matches(self.dirs, name):
                self.dirs.remove(name)
        self.state.info = dict(info)
        atomic_write_json(self.file(MANIFEST), self.state.to_json())  # (every folder checked in place first)
        self.dirs.remove(JOURNAL)
        self._remove_legacy_manifests()  # the new manifest replaces it
        return self.state


class OutputLock:
    """Exclusive ``flock`` on ``OUT/.neoxconv.lock`` for a whole merge, split or reshard; the file records the
    holder's pid and command.

    The lock file is removed (while still locked) when the merge ends, so a finished OUT holds only its
    outputs. A merge killed with SIGKILL leaves the file behind unlocked; the next merge takes it over.
    Every open, stat and unlink of it is relative to OUT's descriptor (``dir_fd``, the run's `OutDir`; opened
    here when not given): OUT swapped for a link meanwhile never makes it create or remove a lock elsewhere.
    """

    def __init__(self, out: Path, command: str = "merge", *, dir_fd: int | None = None) -> None:
        self.out = Path(out)
        self.command = command
        self.path = self.out / LOCK
        self._fd: int | None = None
        self._given_dir = dir_fd
        self._dir: int | None = None

    def __enter__(self) -> OutputLock:
        if self._dir is None:
            try:
                self._dir = self._given_dir if self._given_dir is not None else open_folder(self.out)
            except OSError as e:
                raise OutputError(f"{self.out}: cannot write in the output folder: {e.strerror or e}") from None
        try:
            self._take()
        except BaseException:
            self._release_dir()
            raise
        return self

    def _release_dir(self) -> None:
        d, self._dir = self._dir, None
        if d is not None and d != self._given_dir:
            os.close(d)

    def _take(self) -> None:
        while self._fd is None:
            try:
                # O_NOFOLLOW: a symlink planted as the lock must not make us create or lock a file elsewhere
                fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644,
                             dir_fd=self._dir)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EISDIR):
                    what = "a symbolic link" if e.errno == errno.ELOOP else "a directory"
                    raise OutputError(f"{self.path}: is {what}, not neoxconv's lock file; remove it, "
                                      "then re-run") from None
                raise OutputError(f"{self.out}: cannot write in the output folder: {e.strerror or e}") from None
            if not self._own_lock_file(fd):  # a hard link or special file planted as the lock: never write it
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder, command = _read_holder(fd)
                os.close(fd)
                who = f" (pid {holder})" if holder else ""
                raise OutputError(
                    f"{self.out}: another neoxconv {command or 'run'}{who} is writing into this folder; "
                    "wait for it to finish, or choose another OUT"
                ) from None
            except OSError as e:  # a filesystem without flock (some NFS/FUSE mounts): say so, carry on
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise OutputError(f"{self.path}: cannot lock: {e.strerror or e}") from None
                log.warning("%s: this filesystem does not support locks; make sure no other merge writes into %s",
                            self.path, self.out)
            if not self._same_file(fd):  # the previous holder removed it between our open and flock
                os.close(fd)
                continue
            self._fd = fd
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {self.command}\n".encode(), 0)
            except OSError as e:
                self._unlock()
                raise OutputError(f"{self.path}: cannot write: {e.strerror or e}") from None

    def _own_lock_file(self, fd: int) -> bool:
        """Whether ``fd`` is a plain file with no other name (a lock we may truncate and write). A hard link
        to a file elsewhere (O_NOFOLLOW stops symlinks only) or a special file is closed and unlinked from OUT,
        never written, so the caller re-creates the lock; False then."""
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
            return True
        os.close(fd)
        try:
            here = os.stat(LOCK, dir_fd=self._dir, follow_symlinks=False)
            if (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(LOCK, dir_fd=self._dir)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise OutputError(f"{self.path}: is not neoxconv's lock file (a hard link or special file) and "
                              f"cannot be removed: {e.strerror or e}; remove it, then re-run") from None
        return False

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(LOCK, dir_fd=self._dir, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _unlock(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(LOCK, dir_fd=self._dir)  # while still locked: a waiting opener sees a different file, retries
        except OSError:
            pass
        os.close(fd)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._unlock()
        finally:
            self._release_dir()


def _read_holder(fd: int) -> tuple[int | None, str | None]:
    """(pid, command) from a lock file ("1234 merge"; older files hold the pid alone)."""
    try:
        raw = os.pread(fd, 64, 0).decode("ascii", "replace").split()
    except OSError:
        return None, None
    pid = int(raw[0]) if raw and raw[0].isdigit() else None
    command = raw[1] if len(raw) > 1 and raw[1].isalpha() else ("merge" if pid is not None and len(raw) == 1 else None)
    return pid, command
