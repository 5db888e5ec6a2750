"""The one finiteness check of every writer (merge, split, reshard): inf/nan is refused unless allowed.

Values are counted from their exponent bits (`neoxconv.dtypes.NonFiniteCounter`) as they are written; a
writer calls `report_nonfinite` with the count of one tensor. Without ``--allow-nonfinite`` any inf/nan is a
`MergeError` (exit 5) naming the tensor; with it, a warning that the manifest records with the file, so a
resume without ``--allow-nonfinite`` redoes that file (and fails as a fresh run would).
"""

from __future__ import annotations

import logging

from neoxconv.errors import MergeError

log = logging.getLogger(__name__)


def report_nonfinite(n: int, what: str, dtype: str, *, allow: bool, warnings: list[str],
                     doing: str = "merging") -> None:
    """``what`` (where, key, name) holds ``n`` inf/nan values after ``doing`` to ``dtype``: refused, or a
    warning when allowed."""
    if n:
        msg = f"{what} has {n} non-finite value(s) (inf/nan) after {doing} to {dtype}"
        if not allow:
            raise MergeError(msg + "; pass --allow-nonfinite to write it anyway")
        warnings.append(msg)
        log.warning(msg)
