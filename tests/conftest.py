"""Shared fixtures: tiny GPT-NeoX checkpoints in the real 20B file layout, built once per session.

``make_checkpoint`` builds them with ``neox_checkpoints`` (a transformers GPTNeoXForCausalLM split by an
independent tensor-parallel split and saved as DeepSpeed saves: no neoxconv rule table, STYLE.md #11);
``merged_fixture`` is the committed fixture merged once (read it, copy it to change it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from neoxconv.cli import main  # noqa: E402
from neoxconv.tools.synthetic import SyntheticSpec, tiny_config  # noqa: E402

from neox_checkpoints import NeoXCheckpoint, build_neox_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMITTED_FIXTURE = REPO / "tests" / "fixtures" / "tiny_tp2_fp16"


def find_real_tokenizer() -> Path | None:
    """The GPT-NeoX-20B tokenizer: $NEOXCONV_TOKENIZER when set (as the demo reads it), else ../shared/data
    next to the checkout or one level up (a git worktree). None when absent: those tests are skipped."""
    env = os.environ.get("NEOXCONV_TOKENIZER")
    if env:
        return Path(env) if Path(env).is_file() else None
    for base in (REPO.parent, REPO.parent.parent):
        path = base / "shared" / "data" / "20B_tokenizer.json"
        if path.is_file():
            return path
    return None


REAL_TOKENIZER = find_real_tokenizer()


def cli(*args):
    """Run the neoxconv CLI in-process; every argument goes in as ``str``."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, code, *words):
    """Exit ``code``, one ``neoxconv: error:`` line naming ``words``, never an internal error."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [ln for ln in result.output.splitlines() if ln.startswith("neoxconv: ")]
    assert len(lines) == 1 and lines[0].startswith("neoxconv: error: "), result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def subprocess_env() -> dict[str, str]:
    """The environment for a ``python -m neoxconv`` subprocess: this checkout's neoxconv comes first."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="session")
def real_tokenizer() -> Path | None:
    return REAL_TOKENIZER


@pytest.fixture(scope="session")
def neox_checkpoint(tmp_path_factory):
    """``neox_checkpoint(tp=2, layout="pipeline", dtype="float16", **spec_and_config_overrides)`` ->
    ``NeoXCheckpoint`` (root, the transformers model whose state_dict is the truth, reference, spec).

    Identical requests share one checkpoint: treat it as read-only (copy it to change it).
    """
    cache: dict[tuple, NeoXCheckpoint] = {}

    def make(tp: int = 2, layout: str = "pipeline", dtype: str = "float16", *, seed: int = 0,
             tokenizer: Path | None = None, config_overrides: dict | None = None, **spec_kw) -> NeoXCheckpoint:
        key = (tp, layout, dtype, seed, str(tokenizer), tuple(sorted((config_overrides or {}).items())),
               tuple(sorted(spec_kw.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"ckpt-tp{tp}-{layout}-{dtype}")
            spec = SyntheticSpec(tiny_config(**(config_overrides or {})), tp_degree=tp, layout=layout, dtype=dtype,
                                 seed=seed, tokenizer=tokenizer, **spec_kw)
            cache[key] = build_neox_checkpoint(root, spec)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def make_checkpoint(neox_checkpoint):
    """``make_checkpoint(tp=2, layout="pipeline", dtype="float16", **spec_and_config_overrides)``.

    Returns ``(root, reference_state_dict, spec)``; identical requests share one checkpoint (read-only).
    """

    def make(*args, **kw):
        ckpt = neox_checkpoint(*args, **kw)
        return ckpt.root, ckpt.reference, ckpt.spec

    return make


@pytest.fixture(scope="session")
def merged_fixture(tmp_path_factory) -> Path:
    """The committed fixture merged once by ``neoxconv merge -q`` (default options: fp16, BLAKE3 manifest).

    Shared by every test of the session: read it, or ``shutil.copytree`` it before changing anything.
    """
    out = tmp_path_factory.mktemp("merged-fixture") / "out"
    result = cli("merge", "-q", COMMITTED_FIXTURE, out)
    if result.exit_code != 0:
        raise RuntimeError(f"merging {COMMITTED_FIXTURE} failed: {result.output}")
    return out


# ---- shared by the tests of several behaviours (see /work/tools/test_moves.md) -----------------------------
STEP = "global_step150000"  # the committed fixture's step folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file directly in ``folder``, by name (what "byte-identical output" compares)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture()
def src_copy(tmp_path) -> Path:
    """A private copy of the committed fixture, at ``tmp_path / "src"``, to damage."""
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    return tmp_path / "src"


@pytest.fixture()
def merged_fixture_copy(merged_fixture, tmp_path) -> Path:
    """A private copy of ``merged_fixture``, at ``tmp_path / "copy"``, to damage."""
    shutil.copytree(merged_fixture, tmp_path / "copy")
    return tmp_path / "copy"


@pytest.fixture(scope="session")
def merged_fp32(make_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """``(src, out)``: ``make_checkpoint(2, "pipeline", "float32")`` merged once by ``neoxconv merge -q``."""
    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    out = tmp_path_factory.mktemp("merged-fp32") / "out"
    result = cli("merge", "-q", root, out)
    if result.exit_code != 0:
        raise RuntimeError(f"merging {root} failed: {result.output}")
    return root, out
