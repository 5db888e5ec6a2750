"""The tokenizer: found, copied, refused or hostile, in merge, split, reshard and verify."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neoxconv.cli import main
from neoxconv.config import padded_vocab_size
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.output.split import SplitOptions, split_model

from conftest import COMMITTED_FIXTURE, cli, one_line_error, verify_json

transformers = pytest.importorskip("transformers")


def _tokenizer(path: Path, n: int) -> Path:
    import json

    vocab = {f"t{i}": i for i in range(n - 1)}
    eos = {"id": n - 1, "content": "<|endoftext|>", "special": True, "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": False}  # every field, as tokenizers writes it (it loads nothing less)
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": [eos]}))
    return path


def test_a_tokenizer_bigger_than_the_embedding_is_refused(tmp_path):
    # Before: merge wrote a model whose tokenizer yields ids past its embedding (exit 0); verify --prompt then
    # failed on the output ("token ids ... are outside the vocabulary"). synth wrote such a pair too.
    rows = 512  # the committed fixture's padded vocabulary (2 ranks x 256)
    big = _tokenizer(tmp_path / "tok.json", rows + 1)
    one_line_error(cli("merge", "-q", COMMITTED_FIXTURE, tmp_path / "out", "--tokenizer", big), 4,
                    "tok.json", f"{rows + 1} tokens", f"{rows} rows", "--tokenizer")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    fits = _tokenizer(tmp_path / "fits.json", rows)
    r = cli("merge", "-q", COMMITTED_FIXTURE, tmp_path / "out2", "--tokenizer", fits)
    assert r.exit_code == 0, r.output
    one_line_error(cli("synth", tmp_path / "c", "--hidden", 64, "--heads", 4, "--vocab", 128, "--tokenizer",
                         _tokenizer(tmp_path / "t200.json", 200)), 2, "200 tokens", "--vocab 128")


def test_tokenizer_and_config_are_written_for_auto_tokenizer(make_checkpoint, tmp_path, real_tokenizer):
    if real_tokenizer is None:
        pytest.skip("no real 20B tokenizer (set NEOXCONV_TOKENIZER, or put it in ../shared/data)")
    root, _, _ = make_checkpoint(2, "pipeline", "float16", tokenizer=real_tokenizer)
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("Hello world")["input_ids"] == [12092, 1533]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["eos_token_id"] == 0 and cfg["bos_token_id"] == 0  # <|endoftext|>, not HF's default 2


@pytest.mark.parametrize("name", ["latest", "neoxconv-neox.json", "neoxconv.json", "neox.yml"])
def test_split_and_reshard_write_the_tokenizer_under_its_own_name_whatever_it_is_called(hf_single, make_checkpoint,
                                                                                         tmp_path, name):
    tok = tmp_path / "tok" / name
    tok.parent.mkdir()
    tok.write_text(json.dumps({"model": {"vocab": {"<|endoftext|>": 0, "a": 1}, "unk_token": "<|endoftext|>"}}))
    for command, src in (("split", hf_single), ("reshard", make_checkpoint(2)[0])):
        out = tmp_path / command
        assert cli(command, src, out, "--tp", "2", "--tokenizer", tok, "-q").exit_code == 0
        assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
        assert (out / "latest").read_text().startswith("global_step")
        assert cli(command, src, out, "--tp", "2", "--tokenizer", tok, "-q").exit_code == 0  # a no-op re-run


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    from conftest import make_hf_folder

    return make_hf_folder(tmp_path_factory.mktemp("hf"))


_BROKEN_TOKENIZERS = {
    "not json": "{\"model\": {\"vocab\": ",
    "no model": json.dumps({"added_tokens": []}),
    "more tokens than rows": json.dumps({"model": {"vocab": {f"t{i}": i for i in range(600)}}}),
    "bad eos id": json.dumps({"model": {"vocab": {"a": 1}}, "added_tokens": [{"id": "0", "content": "<|endoftext|>"}]}),
}


@pytest.mark.parametrize("how", ["next to HF_DIR", "--tokenizer"])
@pytest.mark.parametrize("kind", sorted(_BROKEN_TOKENIZERS))
def test_split_and_reshard_refuse_a_broken_tokenizer_as_merge_does(tmp_path, hf_folder, kind, how):
    # Before: split and reshard copied any tokenizer.json into OUT verbatim (merge refuses these with exit 4).
    tok = tmp_path / "tokenizer.json"
    tok.write_text(_BROKEN_TOKENIZERS[kind])
    if how == "--tokenizer":
        src, extra = hf_folder, ("--tokenizer", tok)
    else:
        src, extra = tmp_path / "hf", ()
        shutil.copytree(hf_folder, src)
        shutil.copy(tok, src / "tokenizer.json")
        tok = src / "tokenizer.json"
    out = tmp_path / "neox"
    one_line_error(cli("split", "-q", "--tp", 2, *extra, src, out), 4, tok)
    assert not (out / "configs").exists() and not (out / "tokenizer.json").exists()
    if how == "--tokenizer" and kind != "more tokens than rows":  # reshard the committed NeoX fixture (more rows)
        one_line_error(cli("reshard", "-q", "--tp", 1, "--tokenizer", tok, COMMITTED_FIXTURE, tmp_path / "re"), 4, tok)
        assert not (tmp_path / "re" / "tokenizer.json").exists()


def test_split_still_copies_a_good_tokenizer(tmp_path, hf_folder):
    src = tmp_path / "hf"
    shutil.copytree(hf_folder, src)
    good = {"model": {"vocab": {"<|endoftext|>": 0, "a": 1}, "unk_token": "<|endoftext|>"}}  # tokenizers loads it
    (src / "tokenizer.json").write_text(json.dumps(good))
    r = cli("split", "-q", "--tp", 2, src, tmp_path / "neox")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "neox" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def _deep(n):
    return "[" * n + "]" * n


@pytest.mark.parametrize("content", [
    '{"model": {}, "added_tokens": ' + _deep(100_000) + "}",
    '{"model": {}, "added_tokens": [1, "x", null]}',
    '{"model": {}, "added_tokens": [{"content": "<|endoftext|>", "id": "zero"}]}',
    '{"model": {}, "added_tokens": [{"content": "<|endoftext|>", "id": 1e400}]}',
    '{"model": {"vocab": {"<|endoftext|>": -1}}}',
    '{"model": "bpe", "added_tokens": {"a": 1}}',
    b'{"model": {"vocab": {"\xff": 0}}}',
    "[]",
], ids=["deep", "not-dicts", "str-id", "inf-id", "negative-id", "odd-types", "not-utf8", "list"])
def test_hostile_tokenizer_json(tmp_path, content):
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line_error(cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "--tokenizer", tok), 4, tok)


@pytest.mark.parametrize("tp,divisor", [(1, 512), (2, 128), (4, 128)])
def test_tokenizer_is_copied_and_sets_the_vocab_divisor(hf_dir, tmp_path, tp, divisor):
    """A 301-entry tokenizer with 512 embedding rows: 128 x TP pads 301 to 512 at TP 2 and 4, not at TP 1."""
    src = tmp_path / "hf"
    src.mkdir()
    for f in hf_dir(torch.float16).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    vocab = {f"t{i}": i for i in range(300)}
    tok = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []},
           "added_tokens": [{"id": 300, "content": "<|endoftext|>", "special": True, "single_word": False,
                             "lstrip": False, "rstrip": False, "normalized": False}]}  # as tokenizers writes it
    (src / "tokenizer.json").write_text(json.dumps(tok))
    report = split_model(src, tmp_path / "n", SplitOptions(tp=tp, quiet=True))
    assert report.make_vocab_size_divisible_by == divisor
    assert (tmp_path / "n" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    raw = json.loads((tmp_path / "n" / "neoxconv.json").read_text())
    assert "tokenizer.json" in raw["files"] and raw["make_vocab_size_divisible_by"] == divisor
    assert padded_vocab_size(301, divisible_by=divisor, tp_degree=tp) == 512


# ----- a tokenizer.json the tokenizers library refuses ----------------------------------------------------
def _eos(i: int) -> dict:
    return {"id": i, "content": "<|endoftext|>", "special": True, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False}


REFUSED = {  # each passes neoxconv's own JSON checks (model entry, ids, <|endoftext|> id)
    "added token lacks fields": {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                                 "added_tokens": [{"id": 1, "content": "<|endoftext|>", "special": True}]},
    "unknown model type": {"model": {"type": "Bogus", "vocab": {"<|endoftext|>": 0}}},
    "merge of unknown tokens": {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["x y"]},
                                "added_tokens": [_eos(1)]},
    "unknown normalizer": {"normalizer": {"type": "Shout"}, "added_tokens": [_eos(1)],
                           "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}},
    "unknown decoder": {"decoder": {"type": "Nope"},
                        "model": {"type": "WordLevel", "vocab": {"<|endoftext|>": 0}, "unk_token": "<|endoftext|>"}},
    "bad split regex": {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated",
                                          "invert": False},
                        "model": {"type": "WordLevel", "vocab": {"<|endoftext|>": 0}, "unk_token": "<|endoftext|>"}},
}


@pytest.mark.parametrize("command", ["merge", "split", "reshard"])
@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_tokenizer_the_library_refuses_is_not_copied(merged_fixture, tmp_path, command, kind):
    bad = tmp_path / "bad_tokenizer.json"
    bad.write_text(json.dumps(REFUSED[kind]))
    out = tmp_path / "out"
    args = {"merge": ["merge", "-q", COMMITTED_FIXTURE, out],
            "split": ["split", "-q", "--tp", 2, merged_fixture, out],
            "reshard": ["reshard", "-q", "--tp", 1, COMMITTED_FIXTURE, out]}[command]
    one_line_error(cli(*args, "--tokenizer", bad), 4, bad, "tokenizers library cannot load")
    assert not out.exists() or not [p for p in out.iterdir() if p.name.endswith("tokenizer.json")]


@pytest.mark.parametrize("command", ["merge", "split", "reshard"])
def test_a_tokenizer_the_library_loads_is_copied_byte_for_byte(merged_fixture, tmp_path, command):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    good = tmp_path / "good_tokenizer.json"
    Tokenizer(WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>")).save(str(good))
    out = tmp_path / "out"
    args = {"merge": ["merge", "-q", COMMITTED_FIXTURE, out],
            "split": ["split", "-q", "--tp", 2, merged_fixture, out],
            "reshard": ["reshard", "-q", "--tp", 1, COMMITTED_FIXTURE, out]}[command]
    r = cli(*args, "--tokenizer", good)
    assert r.exit_code == 0, r.output
    copied = out / "tokenizer.json"  # every writer names it so, whatever the source file is called
    assert copied.read_bytes() == good.read_bytes()


def test_without_the_library_the_json_checks_still_hold(tmp_path, monkeypatch):
    """tokenizers is a dependency; where it is missing the library check is skipped, the others are not."""
    from neoxconv.errors import CheckpointError
    from neoxconv.source.tokenizer import checked_token_count

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps(REFUSED["unknown model type"]))
    assert checked_token_count(bad, 512) == 1
    bad.write_text(json.dumps({"model": {"vocab": {"<|endoftext|>": 7}}}))
    with pytest.raises(CheckpointError, match="has 8 tokens"):
        checked_token_count(bad, 4)


def test_the_size_bound_comes_before_any_parse(tmp_path):
    from neoxconv.errors import CheckpointError
    from neoxconv.source.tokenizer import checked_token_count

    huge = tmp_path / "tokenizer.json"
    with open(huge, "wb") as f:  # sparse: no disk used
        f.truncate((256 << 20) + 1)
    with pytest.raises(CheckpointError, match="more than the 256 MB such a file can plausibly hold"):
        checked_token_count(huge, None)
    vocab = tmp_path / "vocab.json"  # a GPT-2 vocab.json (with merges.txt) is bounded the same way
    with open(vocab, "wb") as f:
        f.write(b'{"a": 0}')
        f.truncate((256 << 20) + 1)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(CheckpointError, match="plausibly hold"):
        checked_token_count(vocab, None)
    assert os.path.getsize(huge) > 256 << 20


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
    assert cli("merge", root, out, "--tokenizer", tok_file, "-q").exit_code == 0
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"]
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["eos_token"] == "<|endoftext|>"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = tok("Hello world", return_tensors="pt")
    assert set(enc.keys()) == {"input_ids", "attention_mask"}
    model = transformers.GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    new = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert new.shape == (1, enc["input_ids"].shape[1] + 3)


def test_tests_honour_neoxconv_tokenizer(tmp_path, monkeypatch):
    import conftest

    (tmp_path / "tok.json").write_text("{}")
    monkeypatch.setenv("NEOXCONV_TOKENIZER", str(tmp_path / "tok.json"))
    assert conftest.find_real_tokenizer() == tmp_path / "tok.json"
    monkeypatch.setenv("NEOXCONV_TOKENIZER", str(tmp_path / "absent.json"))
    assert conftest.find_real_tokenizer() is None


def test_text_prompt_with_the_real_tokenizer(make_checkpoint, tmp_path, real_tokenizer):
    if real_tokenizer is None:
        pytest.skip("no real 20B tokenizer (set NEOXCONV_TOKENIZER, or put it in ../shared/data)")
    root, _, _ = make_checkpoint(2, "pipeline", "float16", tokenizer=real_tokenizer)
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    result, report = verify_json(tmp_path / "out", "--prompt", "Hello world", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    assert report["prompt_ids"] == [12092, 1533] and isinstance(report["text"], str)


def test_prompt_without_tokenizer_is_a_clear_error(merged_fp32):
    _, out = merged_fp32
    result = CliRunner().invoke(main, ["verify", str(out), "--prompt", "Hello"])
    assert result.exit_code == 2 and "--ids" in result.output


def test_tokenizer_that_does_not_match_the_model(merged_fp32, tmp_path):
    """A tokenizer copied in after the merge: named as unchecked by integrity; a prompt it encodes outside the
    vocabulary blames the tokenizer (not --ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, out = merged_fp32
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    vocab = json.loads((copy / "config.json").read_text())["vocab_size"]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": vocab + 7}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(copy / "tokenizer.json"))
    result = cli("verify", copy, "--prompt", "hello", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "--prompt: the tokenizer" in result.output and "does not match the model" in result.output
    assert f"[{vocab + 7}]" in result.output
    result = cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    assert "NOT proven: tokenizer.json: not in the manifest" in result.output


def test_unreadable_tokenizer_is_an_input_error(merged_fp32, tmp_path):
    _, out = merged_fp32
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "tokenizer.json").write_text("[1")
    result = cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", "1")
    assert result.exit_code == 4 and "cannot load the tokenizer" in result.output, result.output


def test_no_tokenizer_leaves_it_out_of_out_but_still_takes_its_ids(make_checkpoint, tmp_path):
    """`merge --no-tokenizer` (gpt-neox's converter's --no_save_tokenizer): no tokenizer file in OUT, config.json
    as with it (bos/eos from the tokenizer), the card and the manifest say so; over an earlier merge that wrote
    it, the files go."""
    from tiny_tokenizer import write_tokenizer

    tok = write_tokenizer(tmp_path / "tokenizer.json", ["hello", "world"])
    root, _, _ = make_checkpoint(2, "pipeline", "float16", tokenizer=tok)
    with_tok, without = tmp_path / "with", tmp_path / "without"
    assert cli("merge", "-q", root, with_tok).exit_code == 0
    assert cli("merge", "-q", root, without, "--no-tokenizer").exit_code == 0
    written = {p.name for p in with_tok.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= written
    assert {p.name for p in without.iterdir()} == written - {"tokenizer.json", "tokenizer_config.json"}
    assert (without / "config.json").read_bytes() == (with_tok / "config.json").read_bytes()
    assert "--no-tokenizer" in (without / "README.md").read_text()
    manifest = json.loads((without / "neoxconv.json").read_text())
    assert manifest["tokenizer_source"]["written"] == []
    # over the earlier merge (same source, same weights): the tokenizer files are not kept
    result = cli("merge", root, with_tok, "--no-tokenizer", "--json")
    assert result.exit_code == 0, result.output
    assert {p.name for p in with_tok.iterdir()} == {p.name for p in without.iterdir()}
    assert "not written" in json.loads(result.stdout)["tokenizer"]


# ----- a Hugging Face tokenizer folder's own settings --------------------------------------------------------
_CHAT = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"


def _hf_tokenizer_folder(folder: Path, config: dict | None, *, jinja: str | None = None) -> Path:
    """A tokenizer folder as transformers saves one (`_tokenizer_folder`, with <s> and </s>), and a
    chat_template.jinja when given."""
    path = _tokenizer_folder(folder, ["<unk>", "<s>", "</s>", "<pad>", "hello", "world", "[user]", "[assistant]"],
                             config)
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return path


def test_a_tokenizer_folder_s_special_tokens_and_chat_template_are_carried(make_checkpoint, tmp_path):
    """gpt-neox's converter (--vocab-is-hf-tokenizer) saves the tokenizer folder with AutoTokenizer: its special
    tokens and chat template survive. neoxconv carries them from the tokenizer.json's folder into OUT's
    tokenizer_config.json (keeping its own class), and config.json's bos/eos ids are those tokens'."""
    import transformers

    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    tok = _hf_tokenizer_folder(tmp_path / "tok", {
        "tokenizer_class": "LlamaTokenizer", "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": False, "chat_template": _CHAT,
        "auto_map": {"AutoTokenizer": ["evil.Tokenizer", None]}})
    out = tmp_path / "out"
    result = cli("merge", "-q", root, out, "--tokenizer", tok)
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in cfg
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["add_bos_token"]) == ("<s>", "</s>", "<pad>",
                                                                                          False)
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "hello world"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == "<s>[user] hello world</s>"
    model_cfg = json.loads((out / "config.json").read_text())
    assert (model_cfg["bos_token_id"], model_cfg["eos_token_id"]) == (1, 2)
    # a chat_template.jinja beside it (transformers >= 4.50 saves the template there) is carried the same way
    tok2 = _hf_tokenizer_folder(tmp_path / "tok2", {"eos_token": "</s>"}, jinja=_CHAT)
    assert cli("merge", "-q", root, tmp_path / "out2", "--tokenizer", tok2).exit_code == 0
    assert json.loads((tmp_path / "out2" / "tokenizer_config.json").read_text())["chat_template"] == _CHAT


def test_a_tokenizer_config_naming_tokens_the_tokenizer_lacks_is_refused(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    tok = _hf_tokenizer_folder(tmp_path / "tok", {"eos_token": "<|im_end|>"})
    one_line_error(cli("merge", "-q", root, tmp_path / "out", "--tokenizer", tok), 4, "tokenizer_config.json",
                   "'<|im_end|>' is not a token of tokenizer.json")
    bad = _hf_tokenizer_folder(tmp_path / "bad", {"chat_template": 42})
    one_line_error(cli("merge", "-q", root, tmp_path / "out2", "--tokenizer", bad), 4, "chat_template")


# ----- 4. merge --no-tokenizer's removal of the previous run's files ----------------------------------------------
def test_no_tokenizer_keeps_a_tokenizer_file_the_user_edited(tmp_path):
    """merge, then the user puts their own tokenizer_config.json (a chat template) in OUT, then `merge
    --no-tokenizer` (same source, same recorded options: the resume path) to leave the tokenizer alone: the user's
    file was deleted. It is kept now, as the model card's rule (`hand_over`) keeps a file that differs from its
    recorded entry."""
    from tiny_tokenizer import write_tokenizer

    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    write_tokenizer(tmp_path / "src" / "tokenizer.json", ["hello", "world"])
    assert cli("merge", "-q", tmp_path / "src", tmp_path / "out").exit_code == 0
    mine = tmp_path / "out" / "tokenizer_config.json"
    assert mine.is_file()
    mine.write_text('{"chat_template": "the user\'s own"}')
    result = cli("merge", "-q", tmp_path / "src", tmp_path / "out", "--no-tokenizer")
    assert result.exit_code == 0, result.output
    assert mine.is_file() and "the user's own" in mine.read_text()






# ----- 1. a tokenizer folder's settings ------------------------------------------------------------------------
def _tokenizer_folder(folder: Path, words: list[str], config: dict | None) -> Path:
    """A Hugging Face tokenizer folder: a word-level tokenizer.json (the words' ids are their positions; the ones
    in angle brackets are special) and, when given, its tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([w for w in words if w.startswith("<")])
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


def _ids(out: Path) -> tuple[tuple, tuple]:
    """(config.json's bos/eos ids, AutoTokenizer(OUT)'s bos/eos ids)."""
    model = json.loads((out / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    return (model.get("bos_token_id"), model.get("eos_token_id")), (tok.bos_token_id, tok.eos_token_id)


WITH_EOT = ["<|endoftext|>", "<s>", "</s>", "<pad>", "hello", "world"]


WITHOUT_EOT = ["<unk>", "<s>", "</s>", "<pad>", "hello", "world"]


def test_the_held_case_bos_and_eos_both_given_agree_with_transformers(vocab512_src, tmp_path):
    """Both special tokens named by the folder: config.json's ids are what transformers loads from OUT (held)."""
    tok = _tokenizer_folder(tmp_path / "tok", WITHOUT_EOT, {"bos_token": "<s>", "eos_token": {"content": "</s>",
                                                                                            "__type": "AddedToken",
                                                                                            "odd": [1]}})
    assert cli("merge", "-q", vocab512_src, tmp_path / "out", "--tokenizer", tok).exit_code == 0
    assert _ids(tmp_path / "out") == ((1, 2), (1, 2))
    # a deliberately wrong id in config.json is what this comparison catches
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    (tmp_path / "out" / "config.json").write_text(json.dumps({**cfg, "bos_token_id": 0}))
    model_ids, tok_ids = _ids(tmp_path / "out")
    assert model_ids != tok_ids


def test_a_folder_naming_only_eos_gives_the_same_bos_in_config_and_tokenizer(vocab512_src, tmp_path):
    """tokenizer.json holds <|endoftext|> (0), <s> (1), </s> (2); its tokenizer_config.json names eos_token </s>
    only. Today: exit 0, config.json bos 2 / eos 2, AutoTokenizer(OUT) bos 0 / eos 2."""
    tok = _tokenizer_folder(tmp_path / "tok", WITH_EOT, {"eos_token": "</s>"})
    assert cli("merge", "-q", vocab512_src, tmp_path / "out", "--tokenizer", tok).exit_code == 0
    model_ids, tok_ids = _ids(tmp_path / "out")
    assert model_ids == tok_ids


def test_a_folder_naming_only_bos_does_not_leave_config_ids_at_the_default(vocab512_src, tmp_path):
    """No <|endoftext|> in tokenizer.json, tokenizer_config.json names bos_token <s> only. Today: exit 0,
    config.json bos 0 / eos 0 (the <unk> token; verify stops generating at it), AutoTokenizer bos 1 / eos None."""
    tok = _tokenizer_folder(tmp_path / "tok", WITHOUT_EOT, {"bos_token": "<s>"})
    result = cli("merge", "-q", vocab512_src, tmp_path / "out", "--tokenizer", tok)
    if result.exit_code != 0:  # refusing a folder whose eos cannot be told is a fix too
        one_line_error(result, 4, "tokenizer")
        return
    (bos, eos), (tok_bos, tok_eos) = _ids(tmp_path / "out")
    assert bos == tok_bos and eos == tok_eos


def test_a_non_utf8_chat_template_jinja_is_a_one_line_error_naming_it(vocab512_src, tmp_path):
    tok = _tokenizer_folder(tmp_path / "tok", WITHOUT_EOT, {"eos_token": "</s>"})
    (tmp_path / "tok" / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    one_line_error(cli("merge", "-q", vocab512_src, tmp_path / "out", "--tokenizer", tok), 4, "chat_template.jinja")


@pytest.mark.parametrize("value, words", [
    (["</s>"], "eos_token"), (2, "eos_token"), ({"special": True}, "eos_token"),
])
def test_special_tokens_that_are_not_text_are_refused_naming_the_file(vocab512_src, tmp_path, value, words):
    tok = _tokenizer_folder(tmp_path / "tok", WITHOUT_EOT, {"eos_token": value})
    one_line_error(cli("merge", "-q", vocab512_src, tmp_path / "out", "--tokenizer", tok), 4, "tokenizer_config.json",
                   words)


@pytest.mark.parametrize("case", ["deep", "huge", "not-utf8", "list", "dev-zero-link"])
def test_a_hostile_tokenizer_config_json_is_refused_or_ignored_never_an_internal_error(vocab512_src, tmp_path, case):
    tok = _tokenizer_folder(tmp_path / "tok", WITHOUT_EOT, None)
    cfg = tmp_path / "tok" / "tokenizer_config.json"
    if case == "deep":
        cfg.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "huge":
        with open(cfg, "wb") as f:
            f.truncate(70_000_000)  # sparse: over the small-file bound
    elif case == "not-utf8":
        cfg.write_bytes(b'{"eos_token": "\xff"}')
    elif case == "list":
        cfg.write_text('["eos_token", "</s>"]')
    else:
        os.symlink("/dev/zero", cfg)
    result = cli("merge", "-q", vocab512_src, tmp_path / "out", "--tokenizer", tok)
    if case == "dev-zero-link":  # not a regular file: not read (as if absent)
        assert result.exit_code == 0, result.output
    else:
        one_line_error(result, 4, "tokenizer_config.json")


def test_chat_templates_as_named_lists_load_in_transformers(vocab512_src, tmp_path):
    """A list of {name, template} with an extra key: carried, and transformers takes it (held)."""
    template = [{"name": "default", "template": "{{ messages[0]['content'] }}", "extra": 1},
                {"name": "tool_use", "template": "T"}]
    tok = _tokenizer_folder(tmp_path / "tok", WITHOUT_EOT, {"eos_token": "</s>", "chat_template": template})
    assert cli("merge", "-q", vocab512_src, tmp_path / "out", "--tokenizer", tok).exit_code == 0
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "hello"
    odd = _tokenizer_folder(tmp_path / "odd", WITHOUT_EOT, {"chat_template": [{"name": "x", "template": 3}]})
    one_line_error(cli("merge", "-q", vocab512_src, tmp_path / "out2", "--tokenizer", odd), 4, "chat_template")


def test_no_tokenizer_still_takes_the_folder_s_ids(vocab512_src, tmp_path):
    tok = _tokenizer_folder(tmp_path / "tok", WITHOUT_EOT, {"bos_token": "<s>", "eos_token": "</s>"})
    assert cli("merge", "-q", vocab512_src, tmp_path / "with", "--tokenizer", tok).exit_code == 0
    assert cli("merge", "-q", vocab512_src, tmp_path / "without", "--tokenizer", tok, "--no-tokenizer").exit_code == 0
    assert not (tmp_path / "without" / "tokenizer.json").exists()
    with_cfg = json.loads((tmp_path / "with" / "config.json").read_text())
    without_cfg = json.loads((tmp_path / "without" / "config.json").read_text())
    assert (without_cfg["bos_token_id"], without_cfg["eos_token_id"]) == (with_cfg["bos_token_id"],
                                                                          with_cfg["eos_token_id"]) == (1, 2)






# ----- 5. finish's removal of the previous run's files ---------------------------------------------------------
def _tokenized(vocab512_src: Path, tmp_path: Path) -> tuple[Path, Path]:
    tok = _tokenizer_folder(tmp_path / "tok", WITHOUT_EOT, {"bos_token": "<s>", "eos_token": "</s>"})
    out = tmp_path / "out"
    assert cli("merge", "-q", vocab512_src, out, "--tokenizer", tok).exit_code == 0
    return out, tok


@pytest.mark.parametrize("planted", ["folder", "symlink"])
def test_no_tokenizer_never_removes_a_folder_or_a_link_target(vocab512_src, tmp_path, planted):
    out, tok = _tokenized(vocab512_src, tmp_path)
    keep = tmp_path / "precious.json"
    shutil.copyfile(out / "tokenizer.json", keep)  # same bytes as the manifest records
    written = keep.read_bytes()
    (out / "tokenizer.json").unlink()
    if planted == "folder":
        (out / "tokenizer.json").mkdir()
        (out / "tokenizer.json" / "inside").write_text("x")
    else:
        os.symlink(keep, out / "tokenizer.json")
    result = cli("merge", "-q", vocab512_src, out, "--tokenizer", tok, "--no-tokenizer")
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert keep.read_bytes() == written
    assert (out / "tokenizer.json").is_symlink() if planted == "symlink" else (out / "tokenizer.json").is_dir()
    if planted == "folder":
        assert (out / "tokenizer.json" / "inside").read_text() == "x"


@pytest.mark.parametrize("name", ["../other/config.json", "OTHER_ABS", "sub/config.json", "notes.txt"])
def test_a_hand_edited_manifest_cannot_make_finish_remove_files_it_did_not_write(vocab512_src, tmp_path, name):
    """The previous manifest lists a file outside OUT (another output's config.json), one in a subfolder, or a
    name merge never writes, each with its true size and hash: finish leaves them all (held)."""
    out, tok = _tokenized(vocab512_src, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(out / "config.json", other / "config.json")
    (out / "sub").mkdir()
    shutil.copyfile(out / "config.json", out / "sub" / "config.json")
    shutil.copyfile(out / "config.json", out / "notes.txt")
    name = str(other / "config.json") if name == "OTHER_ABS" else name
    manifest = json.loads((out / "neoxconv.json").read_text())
    manifest["files"][name] = dict(manifest["files"]["config.json"])
    (out / "neoxconv.json").write_text(json.dumps(manifest))
    result = cli("merge", "-q", vocab512_src, out, "--tokenizer", tok, "--no-tokenizer")
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    for f in (other / "config.json", out / "sub" / "config.json", out / "notes.txt"):
        assert f.is_file(), f
    assert result.exit_code == 0, result.output
    assert not (out / "tokenizer.json").exists()  # what it did write (and is unchanged) goes
