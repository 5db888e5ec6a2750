"""The output folder: is it a folder, who owns it, one merge at a time, and what neoxconv may delete in it.

Rules (each has a test in ``tests/test_safety.py``):

* OUT must be a folder or not exist yet; a file, a dangling symlink or an unwritable place is an
  `OutputError` (exit 6) naming OUT, never an internal error.
* One merge at a time: `OutputLock` holds ``fcntl.flock`` on ``OUT/.neoxconv.lock`` (which records the
  holder's pid) for the whole merge; a second merge into the same OUT is refused with that pid.
* Ownership is decided before anything is deleted. Only names neoxconv itself writes are ever removed
  (`is_output_name`, and their hidden temporaries), and with ``--force`` only those the previous manifest
  lists: a user's ``notes.txt`` or ``.notes.neoxconv-tmp`` is never touched, whatever a manifest claims.
  `split` / `reshard` pass their own name test (``is_ours``, over paths relative to OUT such as
  ``global_step0/layer_02-model_00-model_states.pt``); a path is never followed through a symlink or
  outside OUT.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from neoxconv.errors import OutputError
from neoxconv.check.integrity import INDEX, JOURNAL, MANIFEST
from neoxconv.output.writer import TMP_SUFFIX

log = logging.getLogger(__name__)

LOCK = ".neoxconv.lock"
_WEIGHT_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_FIXED_NAMES = frozenset({"config.json", "tokenizer.json", "tokenizer_config.json", INDEX, MANIFEST, JOURNAL})


def is_output_name(name: str) -> bool:
    """A file name neoxconv's merge writes (weights, config, tokenizer files, index, manifest, journal)."""
    return name in _FIXED_NAMES or bool(_WEIGHT_FILE.match(name))


def is_temp_name(name: str, is_ours: Callable[[str], bool] = is_output_name, folder: str = "") -> bool:
    """The hidden temporary of one of neoxconv's own output names (``.config.json.neoxconv-tmp``).

    ``folder`` is the temporary's folder relative to OUT (``configs/``), for names ``is_ours`` tests as paths.
    """
    return name.startswith(".") and name.endswith(TMP_SUFFIX) and is_ours(folder + name[1 : -len(TMP_SUFFIX)])


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


def load_state(out: Path, names: tuple[str, ...] = (JOURNAL, MANIFEST), kind: str | None = None) -> dict[str, Any] | None:
    """The first of ``names`` in OUT that is a readable neoxconv journal or manifest (of ``kind``, if given).

    A symlink, unreadable bytes or JSON that is not neoxconv's count as no state: OUT is then someone else's.
    """
    for name in names:
        p = Path(out) / name
        if p.is_file() and not p.is_symlink():
            try:
                state = json.loads(p.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                continue
            if isinstance(state, dict) and state.get("tool") == "neoxconv" and (kind is None or state.get("kind") == kind):
                return state
    return None


def _entries(out: Path) -> list[Path]:
    try:
        return list(Path(out).iterdir())
    except OSError as e:
        raise OutputError(f"{out}: cannot list the output folder: {e.strerror or e}") from None


def foreign_entries(out: Path, is_ours: Callable[[str], bool] = is_output_name) -> list[str]:
    """Entries of OUT that are not neoxconv's lock or temporaries (what makes a folder someone else's)."""
    return sorted(p.name for p in _entries(out) if p.name != LOCK and not is_temp_name(p.name, is_ours))


def remove_stale_temps(out: Path, is_ours: Callable[[str], bool] = is_output_name, folder: str = "") -> None:
    """Our own temporaries from an interrupted run (only called once OUT is known to be ours).

    ``folder``: a subfolder of OUT (``global_step0/``), checked with `safe_path` first.
    """
    d = safe_path(out, folder.rstrip("/")) if folder else Path(out)
    if d is None or not d.is_dir():
        return
    for p in _entries(d):
        if is_temp_name(p.name, is_ours, folder) and p.is_file() and not p.is_symlink():
            remove_file(p)


def safe_path(out: Path, rel: str) -> Path | None:
    """``OUT/rel`` when ``rel`` is a plain relative path whose every folder is a real folder inside OUT (no
    symlink, no ``..``, nothing absolute); None otherwise. What neoxconv may delete or write through."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
        return None
    path = Path(out)
    for part in parts[:-1]:
        path = path / part
        if path.is_symlink() or not path.is_dir():
            return None
    return path / parts[-1]


def remove_previous_output(out: Path, listed: list[str], is_ours: Callable[[str], bool] = is_output_name) -> list[str]:
    """--force over another neoxconv output: remove what its manifest lists AND neoxconv writes. Returns them."""
    removed = []
    for name in dict.fromkeys(listed):
        path = safe_path(out, str(name)) if is_ours(str(name)) else None
        if path is not None and path.is_file() and not path.is_symlink():
            remove_file(path)
            removed.append(name)
    remove_stale_temps(out, is_ours)
    return removed


def remove_file(path: Path) -> None:
    """Remove one file (gone already is fine); anything else that fails is an `OutputError` naming it."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OutputError(f"{path}: cannot remove: {e.strerror or e}") from None


class OutputLock:
    """Exclusive ``flock`` on ``OUT/.neoxconv.lock`` for a whole merge, split or reshard; the file records the
    holder's pid and command.

    The lock file is removed (while still locked) when the merge ends, so a finished OUT holds only its
    outputs. A merge killed with SIGKILL leaves the file behind unlocked; the next merge takes it over.
    """

    def __init__(self, out: Path, command: str = "merge") -> None:
        self.out = Path(out)
        self.command = command
        self.path = self.out / LOCK
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        while self._fd is None:
            try:
                # O_NOFOLLOW: a symlink planted as the lock must not make us create or lock a file elsewhere
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                             0o644)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EISDIR):
                    what = "a symbolic link" if e.errno == errno.ELOOP else "a directory"
                    raise OutputError(f"{self.path}: is {what}, not neoxconv's lock file; remove it, "
                                      "then re-run") from None
                raise OutputError(f"{self.out}: cannot write in the output folder: {e.strerror or e}") from None
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
                self.__exit__(None, None, None)
                raise OutputError(f"{self.path}: cannot write: {e.strerror or e}") from None
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiting opener sees a different file and retries
        except OSError:
            pass
        os.close(fd)


def _read_holder(fd: int) -> tuple[int | None, str | None]:
    """(pid, command) from a lock file ("1234 merge"; older files hold the pid alone)."""
    try:
        raw = os.pread(fd, 64, 0).decode("ascii", "replace").split()
    except OSError:
        return None, None
    pid = int(raw[0]) if raw and raw[0].isdigit() else None
    command = raw[1] if len(raw) > 1 and raw[1].isalpha() else ("merge" if pid is not None and len(raw) == 1 else None)
    return pid, command
