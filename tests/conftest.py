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

import json  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from neoxconv.cli import main  # noqa: E402
from neoxconv.output.hashing import hash_file, recorded_hash  # noqa: E402
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint  # noqa: E402
from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint  # noqa: E402

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


def assert_no_partial_output(out):
    """No temp files, no index or manifest after a failure."""
    if out.exists():
        names = {p.name for p in out.iterdir()}
        assert not any(n.endswith(".neoxconv-tmp") for n in names), names
        assert "model.safetensors.index.json" not in names and "neoxconv.json" not in names


def merge_fails(root, out, error, *words, **opts):
    with pytest.raises(error) as e:
        merge_checkpoint(root, out, MergeOptions(quiet=True, **opts))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert_no_partial_output(out)
    return str(e.value)


def rewrite_pt(path, change):
    d = torch.load(path, weights_only=True)
    change(d)
    torch.save(d, path)


def all_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def poison_pt(path: Path, key: str, value: float) -> None:
    d = torch.load(path, weights_only=True)
    d[key].view(-1)[3] = value
    torch.save(d, path)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_single(tmp_path_factory):
    return make_hf_folder(tmp_path_factory.mktemp("hf"), seed=4)


def model_files(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))}


@pytest.fixture(scope="session")
def merged_both(merged_fixture, tmp_path_factory) -> Path:
    """The committed fixture merged under each hash: ``merged_both / "blake3"`` (``merged_fixture``'s files) and
    ``merged_both / "sha256"`` (``neoxconv merge --hash sha256``). Read-only: copy a folder to change it."""
    work = tmp_path_factory.mktemp("hashes")
    shutil.copytree(merged_fixture, work / "blake3")
    result = cli("merge", "-q", COMMITTED_FIXTURE, work / "sha256", "--hash", "sha256")
    if result.exit_code != 0:
        raise RuntimeError(f"merging {COMMITTED_FIXTURE} --hash sha256 failed: {result.output}")
    return work


def run_cli(*args: str, timeout: float = 120) -> tuple[int, str, int]:
    """Run ``python -m neoxconv ARGS`` in a child; returns (exit code, stderr, the child's peak RSS in MB)."""
    wrapper = ("import json, resource, subprocess, sys\n"
               "r = subprocess.run([sys.executable, '-m', 'neoxconv', *sys.argv[1:]], capture_output=True, text=True)\n"
               "sys.stderr.write(r.stderr)\n"
               "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, timeout=timeout,
                         env=env)
    rc, rss = json.loads(res.stdout.strip().splitlines()[-1])
    return rc, res.stderr, rss


@pytest.fixture(scope="module")
def clean_merge(tmp_path_factory):
    work = tmp_path_factory.mktemp("clean")
    shutil.copytree(COMMITTED_FIXTURE, work / "src")
    merge_checkpoint(work / "src", work / "out", MergeOptions(quiet=True))
    return work / "src", folder_bytes(work / "out")


VERIFY = ("--ids", "1,2,3", "--max-new-tokens", "2", "--device", "cpu", "--quiet")


TINY = dict(hidden_size=64, num_attention_heads=8, num_hidden_layers=2, vocab_size=512, max_position_embeddings=64)


def tensor_bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def make_hf_folder(folder: Path, *, dtype=torch.float16, seed=0, legacy_config=False, hidden_act="gelu",
                   max_shard_size=None,
             **overrides):
    """A transformers GPTNeoXForCausalLM with every parameter random, saved by save_pretrained (safetensors)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kw = dict(TINY, rotary_pct=0.25, use_parallel_residual=True, hidden_act=hidden_act, eos_token_id=0, bos_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if legacy_config:  # the transformers 4.x form: rotary_pct / rotary_emb_base / torch_dtype at the top level
        cfg = json.loads((folder / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rotary_pct"] = rope["partial_rotary_factor"]
        cfg["rotary_emb_base"] = rope["rope_theta"]
        cfg["torch_dtype"] = cfg.pop("dtype")
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    cache: dict = {}

    def make(dtype=torch.float16, **kw):
        key = (dtype, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_hf_folder(tmp_path_factory.mktemp("hf"), dtype=dtype, **kw)
        return cache[key]

    return make


NEOX_MANIFEST = "neoxconv.json"


def assert_manifest_proves(out: Path) -> None:
    """The manifest is there and every file it lists hashes as recorded (what tamper evidence relies on)."""
    state = json.loads((out / NEOX_MANIFEST).read_text())
    assert state["files"] and state["layers"]
    for name, entry in {**state["layers"], **state["files"]}.items():
        algo, digest = recorded_hash(entry)
        assert hash_file(out / name, algo) == digest, name


@pytest.fixture(params=["split", "reshard"])
def writer_command(request, hf_sharded, make_checkpoint):
    """(command name, source) for both writers of NeoX checkpoints."""
    if request.param == "split":
        return "split", hf_sharded
    return "reshard", make_checkpoint(2, "pipeline", "float16")[0]


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    """A sharded Hugging Face folder (several safetensors files), made by save_pretrained."""
    return make_hf_folder(tmp_path_factory.mktemp("hf"), seed=3, max_shard_size="100KB")


@pytest.fixture()
def hf_copy(hf_sharded, tmp_path):
    return Path(shutil.copytree(hf_sharded, tmp_path / "hf", copy_function=shutil.copy2))


def verify_json(*args):
    result = CliRunner().invoke(main, ["verify", *map(str, args), "--json"])
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


def safetensors_header(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def no_internal_error(result):
    assert "internal error" not in result.output and not isinstance(result.exception, (RuntimeError, ValueError,
                                                                                      AttributeError)), result.output


def rewrite_safetensors_header(path, text: bytes):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def split_tp2(src, out):
    return cli("split", src, out, "--tp", "2", "-q")


@pytest.fixture(scope="session")
def vocab512_src(tmp_path_factory) -> Path:
    """A small TP 2 fp32 checkpoint (vocabulary 512, global_step10) without a tokenizer of its own (read-only)."""
    root = tmp_path_factory.mktemp("vocab512") / "src"
    write_checkpoint(root, SyntheticSpec(config=tiny_config(vocab_size=512), tp_degree=2, dtype="float32", step=10))
    return root
