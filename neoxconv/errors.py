"""One error hierarchy for the library; the CLI maps each class to a one-line message and an exit code.

Exit codes (documented in the README):
    1  NeoXConvError           anything not covered below
    2  UsageError              a request that cannot be met as asked: contradictory options, token ids outside
                               the vocabulary, a missing optional dependency (click uses 2 for bad options too)
    3  ConfigError             the NeoX / Hugging Face config is missing, unreadable or inconsistent
    4  CheckpointError         a source file is missing, unreadable, unsafe or has unexpected contents
    5  MergeError              ranks disagree (shapes, dtypes, replicas) or a value is not finite
    6  OutputError             the output folder cannot be written safely (not empty, disk full, ...)
    7  VerificationError       a verify check failed, or the output does not match its manifest
    130 interrupted            Ctrl-C; the output folder is left resumable
"""

from __future__ import annotations


class NeoXConvError(Exception):
    """Base class of every error neoxconv raises on purpose."""

    exit_code = 1


class UsageError(NeoXConvError):
    """The command line asks for something this input or installation cannot do; fix the options."""

    exit_code = 2


class ConfigError(NeoXConvError):
    exit_code = 3


class CheckpointError(NeoXConvError):
    """A source file is missing, unreadable, unsafe to load, or holds unexpected keys or shapes."""

    exit_code = 4


class UnsafePickleError(CheckpointError):
    """A pickle asked for a callable outside the tensor-rebuild allowlist; nothing was executed."""


class MergeError(NeoXConvError):
    exit_code = 5


class OutputError(NeoXConvError):
    exit_code = 6


class VerificationError(NeoXConvError):
    exit_code = 7


def few(items: list, *, n: int = 5, sep: str = ", ") -> str:
    """At most ``n`` items and a count of the rest: an error line stays short however many things are wrong."""
    shown = sep.join(str(i) for i in items[:n])
    return shown + (f"{sep}and {len(items) - n} more" if len(items) > n else "")
