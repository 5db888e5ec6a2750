"""First-run experience (issue 10), through the CLI: exit codes, dtype-aware checks, files the usual Hugging Face
code can use, --json for scripts, the inspect plan, resume and re-merge messages, demo and synth."""

import json
import re
import shutil
import sys

import pytest
from click.testing import CliRunner

from neoxconv import verify

from neoxconv.output import hf_merge as convert
from neoxconv.cli import main

from conftest import COMMITTED_FIXTURE

IDS = "12,345,67,8"


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def fixture_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ux") / "out"
    assert _run("merge", COMMITTED_FIXTURE, out, "-q").exit_code == 0
    return out


# ----- exit codes ---------------------------------------------------------------------------------------
def test_verify_a_path_that_does_not_exist_is_a_usage_error(tmp_path):
    result = _run("verify", tmp_path / "nowhere", "--ids", IDS)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_verify_a_folder_that_is_not_a_merge_output_is_an_input_error(tmp_path, fixture_out):
    (tmp_path / "empty").mkdir()
    result = _run("verify", tmp_path / "empty", "--ids", IDS)
    assert result.exit_code == 4 and "no config.json" in result.stderr and "neoxconv merge" in result.stderr
    half = tmp_path / "half"  # config.json but no index: not a finished merge
    half.mkdir()
    shutil.copy(fixture_out / "config.json", half)
    result = _run("verify", half, "--ids", IDS)
    assert result.exit_code == 4 and "model.safetensors.index.json" in result.stderr


@pytest.mark.parametrize("args, says", [
    ((), "--prompt TEXT) or token ids (--ids"),
    (("--ids", "1,99999"), "outside the vocabulary"),
    (("--ids", "1,2", "--prompt", "hi"), "not both"),
    (("--ids", "abc"), "comma-separated token ids"),
    (("--prompt", "hi"), "no tokenizer.json"),
    (("--ids", "1,2", "--tokenizer", "/nonexistent/tokenizer.json"), "no such tokenizer file"),
    (("--ids", "1,2", "--against", "/nonexistent/checkpoint"), "does not exist"),
])
def test_verify_usage_errors_exit_2(fixture_out, args, says):
    result = _run("verify", fixture_out, *args)
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


def test_inspect_with_a_rank_file_missing_lists_it_and_exits_4(tmp_path):
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    (tmp_path / "src" / "global_step150000" / "layer_03-model_00-model_states.pt").unlink()
    result = _run("inspect", tmp_path / "src")
    assert result.exit_code == 4
    assert "None" not in result.stdout and "files missing: layer_03-model_00-model_states.pt" in result.stdout
    assert re.match(r"neoxconv: error: .*1 rank file\(s\) missing: layer_03-model_00-model_states\.pt", result.stderr)


@pytest.mark.parametrize("option, module, hint", [
    (("--reference", "hf"), "transformers", "pip install 'neoxconv[hf]'"),
    (("--int8",), "bitsandbytes", "pip install 'neoxconv[int8]'"),
])
def test_missing_optional_dependency_is_refused_up_front(fixture_out, monkeypatch, option, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the dependency check")

    monkeypatch.setattr(verify, "load_model", no_model)
    result = _run("verify", fixture_out, "--ids", IDS, *option)
    assert result.exit_code == 2, result.output
    assert hint in result.stderr and option[0] in result.stderr


# ----- checks that follow the stored dtype --------------------------------------------------------------
@pytest.mark.parametrize("dtype, stored", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_reduced_precision_merge_passes_against_on_cpu(make_checkpoint, tmp_path, dtype, stored):
    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    out = tmp_path / "out"
    assert _run("merge", root, out, "--dtype", dtype, "-q").exit_code == 0
    result = _run("verify", out, "--against", root, "--ids", IDS, "--max-new-tokens", 2, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    against = report["checks"]["against"]
    assert report["dtype"] == "float32" and against["passed"]
    assert f"weights stored in {stored}, rounded from float32" in against["detail"]
    scale = against["tolerance"] / verify.MODEL_TOL[getattr(__import__("torch"), stored)]
    assert scale >= 1.0  # the tolerance is the stored dtype's, times max(1, max|logit|)
    if dtype == "bf16":  # what failed before: bf16 rounding is far above the fp32 tolerance
        assert against["value"] > verify.MODEL_TOL[__import__("torch").float32] * scale


def test_unrounded_weights_keep_the_tight_tolerance(fixture_out):
    """An fp16 source merged to fp16 holds the source's own values: no widening."""
    result = _run("verify", fixture_out, "--against", COMMITTED_FIXTURE, "--ids", IDS, "--max-new-tokens", 2, "--json")
    against = json.loads(result.stdout)["checks"]["against"]
    assert result.exit_code == 0 and "rounded" not in against["detail"]
    assert against["tolerance"] < verify.MODEL_TOL[__import__("torch").float16]  # fp32's x scale (~3.5), not fp16's


def test_bf16_tolerance_still_catches_a_wrong_merge(make_checkpoint, tmp_path, monkeypatch):
    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    real_chunks = convert.iter_merged_chunks

    def swapped(plan, **kw):  # ranks in the wrong order for one row-parallel weight
        if plan.key == "mlp.dense_4h_to_h.weight":
            plan.shards.reverse()
        yield from real_chunks(plan, **kw)

    monkeypatch.setattr(convert, "iter_merged_chunks", swapped)
    assert _run("merge", root, tmp_path / "bad", "--dtype", "bf16", "-q").exit_code == 0
    monkeypatch.undo()
    result = _run("verify", tmp_path / "bad", "--against", root, "--ids", IDS, "--max-new-tokens", 2, "--json")
    assert result.exit_code == 7
    assert not json.loads(result.stdout)["checks"]["against"]["passed"]


# ----- tokenizer files for the usual Hugging Face code ------------------------------------------------------
def _tiny_tokenizer(path):
    """A small byte-level BPE tokenizer.json with <|endoftext|>, built the way `tokenizers` users build one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello world, the capital of France is Paris."] * 20, trainer)
    tok.save(str(path))
    return path


def test_tokenizer_config_gives_input_ids_and_attention_mask_and_generate_works(make_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    out = tmp_path / "out"
    tok_file = _tiny_tokenizer(tmp_path / "tokenizer.json")
    assert _run("merge", root, out, "--tokenizer", tok_file, "-q").exit_code == 0
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"]
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["eos_token"] == "<|endoftext|>"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = tok("Hello world", return_tensors="pt")
    assert set(enc.keys()) == {"input_ids", "attention_mask"}
    model = transformers.GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    new = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert new.shape == (1, enc["input_ids"].shape[1] + 3)


# ----- merge --json and the summary ----------------------------------------------------------------------
def test_merge_json_is_one_object_on_stdout(tmp_path):
    result = _run("merge", COMMITTED_FIXTURE, tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert report["out"] == str(tmp_path / "out")
    assert (report["files_written"], report["files_reused"]) == (len(files), 0)
    assert report["bytes_written"] == sum(f.stat().st_size for f in files)
    assert report["total_size"] == index["metadata"]["total_size"]
    assert (report["dtype"], report["tp_degree"], report["num_layers"], report["row_bias"]) == ("float16", 2, 2, "sum")
    assert report["seconds"] > 0 and report["max_replica_divergence"] == 0.0
    assert "merge" in result.stderr  # the progress bar stays on stderr
    again = json.loads(_run("merge", COMMITTED_FIXTURE, tmp_path / "out", "--json").stdout)
    assert (again["files_written"], again["files_reused"], again["bytes_written"]) == (0, len(files), 0)


def test_summary_says_time_rate_and_dtype_in_the_progress_bars_units(tmp_path):
    result = _run("merge", COMMITTED_FIXTURE, tmp_path / "out", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    summary = result.stdout.strip()
    m = re.search(r"5 file\(s\) written \(([\d.]+) (kB) bfloat16 in ([\d.]+) s, ([\d.]+) (kB|MB)/s\)", summary)
    assert m, summary
    bar_totals = re.findall(r"B/[\d.]+([kMG]?i?B) \[", result.stderr)  # "0.00B/116kB [00:00<?, ?B/s]"
    assert bar_totals and set(bar_totals) == {m.group(2)}, result.stderr  # decimal kB in the bar and the summary


# ----- inspect shows the plan ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_inspect_plan_matches_what_merge_writes(tmp_path, dtype):
    info = json.loads(_run("inspect", COMMITTED_FIXTURE, "--json", "--dtype", dtype, "--out", tmp_path / "new").stdout)
    assert _run("merge", COMMITTED_FIXTURE, tmp_path / "new", "--dtype", dtype, "-q").exit_code == 0
    index = json.loads((tmp_path / "new" / "model.safetensors.index.json").read_text())
    assert info["output_bytes"] == index["metadata"]["total_size"]
    manifest = json.loads((tmp_path / "new" / "neoxconv.json").read_text())
    written = {name: meta for layer in manifest["layers"].values() for name, meta in layer["tensors"].items()}
    assert [t["name"] for t in info["tensors"]] == list(written)
    for t in info["tensors"]:
        assert {k: t[k] for k in ("shape", "dtype", "rule")} == {k: written[t["name"]][k] for k in ("shape", "dtype", "rule")}
        assert index["weight_map"][t["name"]] == t["file"]
    assert info["out_free_bytes"] > 0 and info["out_fits"] is True


def test_inspect_text_shows_thousands_separators_and_the_plan(tmp_path):
    result = _run("inspect", COMMITTED_FIXTURE, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "parameters: 58,240" in result.stdout and "output bytes: 116,480" in result.stdout
    assert "free at OUT:" in result.stdout and "plan: 28 tensors" in result.stdout
    assert re.search(r"sum +float16 +32 +gpt_neox\.layers\.0\.attention\.dense\.bias <- attention\.dense\.bias", result.stdout)


# ----- resume and re-merge ---------------------------------------------------------------------------------
def test_resume_shows_that_it_rechecks_finished_files(tmp_path):
    assert _run("merge", COMMITTED_FIXTURE, tmp_path / "out", "-q").exit_code == 0
    result = _run("merge", COMMITTED_FIXTURE, tmp_path / "out")
    assert result.exit_code == 0
    assert "resume: re-check" in result.stderr and "0 file(s) written" in result.stdout and "5 reused" in result.stdout


def test_remerge_with_other_options_names_the_difference(tmp_path):
    out = tmp_path / "out"
    assert _run("merge", COMMITTED_FIXTURE, out, "--dtype", "fp16", "-q").exit_code == 0
    result = _run("merge", COMMITTED_FIXTURE, out, "--dtype", "fp32", "--row-bias", "replicated")
    assert result.exit_code == 6
    assert result.stderr.strip() == (f"neoxconv: error: {out}: holds a neoxconv merge made with other options: "
                                     "dtype: fp16 before, fp32 now; row-bias: sum before, replicated now; "
                                     "use --no-resume or another OUT")
    result = _run("merge", COMMITTED_FIXTURE, out, "--dtype", "fp32", "--no-resume", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["dtype"] == "float32"
    auto = tmp_path / "auto"
    assert _run("merge", COMMITTED_FIXTURE, auto, "-q").exit_code == 0
    result = _run("merge", COMMITTED_FIXTURE, auto, "--dtype", "bf16")
    assert result.exit_code == 6 and "dtype: auto (float16) before, bf16 now; use --no-resume" in result.stderr


# ----- demo and synth ---------------------------------------------------------------------------------------
def test_demo_says_where_its_files_are(monkeypatch):
    from neoxconv.tools import demo

    seen = []
    monkeypatch.setattr(demo, "_demo", lambda work, *a: seen.append(work))  # the flow itself: test_cli.py
    result = _run("demo")
    assert result.exit_code == 0
    (work,) = seen
    assert f"working in {work}" in result.output and "--workdir DIR" in result.output
    assert not work.exists()


def test_demo_with_workdir_says_what_it_kept(tmp_path, monkeypatch):
    from neoxconv.tools import demo

    monkeypatch.setattr(demo, "_demo", lambda work, *a: None)
    result = _run("demo", "--workdir", tmp_path / "d")
    assert f"files kept in {tmp_path / 'd'}" in result.output and str(tmp_path / "d" / "merged") in result.output


def test_synth_writes_a_checkpoint_of_the_chosen_size(tmp_path):
    from neoxconv.config import NeoXConfig
    from neoxconv.tools.synthetic import parameter_count

    result = _run("synth", tmp_path / "ck", "--tp", 2, "--layers", 3, "--hidden", 64, "--heads", 4, "--vocab", 512,
                  "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    want = parameter_count(NeoXConfig(num_layers=3, hidden_size=64, num_heads=4, vocab_size=512))
    assert f"{want:,} parameters" in result.stdout
    info = json.loads(_run("inspect", tmp_path / "ck", "--json").stdout)
    assert (info["tp_degree"], info["num_layers"], info["hidden_size"], info["num_heads"], info["vocab_size"],
            info["dtype"], info["parameters"]) == (2, 3, 64, 4, 512, "bfloat16", want)
    assert _run("merge", tmp_path / "ck", tmp_path / "m", "-q").exit_code == 0
    assert _run("verify", tmp_path / "m", "--against", tmp_path / "ck", "--ids", IDS, "--max-new-tokens", 2).exit_code == 0
    # refusals: a non-empty OUT (6), a size the TP split cannot hold (2)
    assert _run("synth", tmp_path / "ck", "--hidden", 64, "--heads", 4, "--vocab", 512).exit_code == 6
    result = _run("synth", tmp_path / "x", "--tp", 3, "--hidden", 64, "--heads", 4, "--vocab", 512)
    assert result.exit_code == 2 and "--heads 4 is not divisible by --tp 3" in result.stderr


def test_tests_honour_neoxconv_tokenizer(tmp_path, monkeypatch):
    import conftest

    (tmp_path / "tok.json").write_text("{}")
    monkeypatch.setenv("NEOXCONV_TOKENIZER", str(tmp_path / "tok.json"))
    assert conftest.find_real_tokenizer() == tmp_path / "tok.json"
    monkeypatch.setenv("NEOXCONV_TOKENIZER", str(tmp_path / "absent.json"))
    assert conftest.find_real_tokenizer() is None
