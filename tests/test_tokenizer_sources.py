"""The tokenizers users really have: SentencePiece models, GPT-2 vocab + merges, and the config's vocab-file.

gpt-neox trains with ``tokenizer_type`` HFTokenizer (a tokenizer.json), SPMTokenizer (a tokenizer.model) or
GPT2BPETokenizer / HFGPT2Tokenizer (vocab.json + merges.txt), named by the config's ``vocab-file`` relative to the
folder it ran in. Each must reach OUT so that transformers' AutoTokenizer encodes as the training tokenizer did.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import COMMITTED_FIXTURE, REAL_TOKENIZER, cli, one_line_error
from llama_checkpoints import LlamaSpec, write_llama_checkpoint

TEXTS = ["Hello world, the quick brown fox!", "  two  spaces and a\ttab", "new\nlines\n", "numbers 12345 3.14",
         "ünïcödé 漢字 🙂", " leading space", "The Pile was used to train GPT-NeoX."]
CORPUS = ("The quick brown fox jumps over the lazy dog. GPT-NeoX was trained by EleutherAI on the Pile.\n"
          "Tensor parallel checkpoints are merged into one Hugging Face folder; numbers 12345 and 3.14.\n") * 40


def _merge(*args) -> dict:
    result = cli("merge", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def _with_yaml_lines(root: Path, *lines: str) -> None:
    """Add NeoX config lines (tokenizer settings) before the closing brace of root's YAML."""
    yml = next((root / "configs").glob("*.yml"))
    text = yml.read_text().rstrip()
    yml.write_text(text[:-1].rstrip() + "\n" + "".join(f"  {line},\n" for line in lines) + "}\n")


# ----- SentencePiece (SPMTokenizer) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A Llama-style SentencePiece model (BPE, byte fallback, no normalisation), trained in about a second."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=buf, vocab_size=330, hard_vocab_limit=False,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama") / "ckpt"
    write_llama_checkpoint(root, LlamaSpec(vocab=384))
    return root


def test_sentencepiece_model_round_trips_through_autotokenizer(spm_model, llama_ckpt, tmp_path):
    """--tokenizer tokenizer.model: OUT carries it with a tokenizer.json that encodes exactly as SentencePiece."""
    import sentencepiece
    from transformers import AutoTokenizer, GenerationConfig

    out = tmp_path / "out"
    report = _merge(llama_ckpt, out, "--tokenizer", spm_model)
    assert report["tokenizer"] == "tokenizer.model (--tokenizer)"
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert (out / "tokenizer.model").read_bytes() == spm_model.read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok(text)["input_ids"] == sp.encode(text), text  # no BOS: gpt-neox trained on sp.encode(text)
    assert tok.decode(sp.encode(TEXTS[0])) == TEXTS[0]
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert cli("verify", "-q", out, "--prompt", "The quick", "--max-new-tokens", "2").exit_code == 0


def test_sentencepiece_model_named_by_the_config(spm_model, llama_ckpt, tmp_path):
    """tokenizer_type SPMTokenizer with a vocab-file relative to the folder gpt-neox ran in (the root's parent)."""
    work = tmp_path / "run"
    shutil.copytree(llama_ckpt, work / "ckpt")
    (work / "data").mkdir()
    shutil.copy(spm_model, work / "data" / "llama.model")
    _with_yaml_lines(work / "ckpt", '"tokenizer_type": "SPMTokenizer"', '"vocab-file": "./data/llama.model"')
    out = tmp_path / "out"
    report = _merge(work / "ckpt", out)
    assert report["tokenizer"] == "llama.model (vocab-file of the config)"
    assert (out / "tokenizer.model").read_bytes() == spm_model.read_bytes()
    manifest = json.loads((out / "neoxconv.json").read_text())
    assert manifest["tokenizer_source"]["found_by"] == "vocab-file of the config"
    assert str(work) not in (out / "neoxconv.json").read_text()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_utf8_piece"])
def test_broken_sentencepiece_model_is_refused_naming_it(spm_model, llama_ckpt, tmp_path, damage):
    data = spm_model.read_bytes()
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes({"garbage": b"\x00\xff" * 64, "truncated": data[: len(data) // 2],
                     "not_utf8_piece": data.replace(b"<unk>", b"<\xff\xfek>", 1)}[damage])
    result = cli("merge", llama_ckpt, tmp_path / "out", "--tokenizer", bad)
    one_line_error(result, 4, "tokenizer.model")
    assert not (tmp_path / "out" / "neoxconv.json").exists()


def test_sentencepiece_reader_agrees_with_the_library(spm_model):
    """neoxconv reads the model's pieces and special ids without the sentencepiece package."""
    import sentencepiece

    from neoxconv.source.tokenizer import read_spm

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    model = read_spm(spm_model)
    assert model.pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert model.ids == {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}


# ----- GPT-2 vocab + merges (GPT2BPETokenizer, HFGPT2Tokenizer) -------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A byte-level BPE trained by the tokenizers library, saved as GPT-2's vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS.splitlines(), vocab_size=400, special_tokens=["<|endoftext|>"])
    folder = tmp_path_factory.mktemp("gpt2")
    tok.save_model(str(folder))  # vocab.json, merges.txt
    return folder, tok


def test_gpt2_vocab_and_merges_from_the_config(gpt2_files, tmp_path):
    from transformers import AutoTokenizer

    folder, trained = gpt2_files
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)  # 512 vocabulary rows
    shutil.copy(folder / "vocab.json", src / "gpt2-vocab.json")
    shutil.copy(folder / "merges.txt", src / "gpt2-merges.txt")
    _with_yaml_lines(src, '"tokenizer_type": "GPT2BPETokenizer"', '"vocab-file": "data/gpt2-vocab.json"',
                     '"merge-file": "data/gpt2-merges.txt"')
    out = tmp_path / "out"
    report = _merge(src, out)
    assert report["tokenizer"] == "gpt2-vocab.json + gpt2-merges.txt (vocab-file of the config)"
    assert (out / "vocab.json").read_bytes() == (folder / "vocab.json").read_bytes()
    assert (out / "merges.txt").read_bytes() == (folder / "merges.txt").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok(text)["input_ids"] == trained.encode(text).ids, text
    eos = trained.token_to_id("<|endoftext|>")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    assert cli("verify", "-q", out, "--prompt", "The quick", "--max-new-tokens", "2").exit_code == 0


def test_hfgpt2_folder_as_vocab_file(gpt2_files, tmp_path):
    """HFGPT2Tokenizer's vocab-file is a folder GPT2TokenizerFast.from_pretrained reads."""
    folder, _ = gpt2_files
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    shutil.copytree(folder, tmp_path / "gpt2-tokenizer")
    _with_yaml_lines(src, '"tokenizer_type": "HFGPT2Tokenizer"', '"vocab-file": "gpt2-tokenizer"')
    out = tmp_path / "out"
    assert _merge(src, out)["tokenizer"] == "vocab.json + merges.txt (vocab-file of the config)"
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in out.iterdir()}


# ----- the config's vocab-file -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_tokenizer_json(tmp_path_factory) -> Path:
    """A tokenizer.json of under 512 tokens (the committed fixture's rows), with <|endoftext|>."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS.splitlines(), vocab_size=300, special_tokens=["<|endoftext|>"])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_relative_vocab_file_resolves_from_the_folder_gpt_neox_ran_in(small_tokenizer_json, tmp_path):
    """As the 20B release: "./20B_checkpoints/20B_tokenizer.json" from the root's parent; a tokenizer elsewhere is
    found only through the config."""
    src = tmp_path / "20B_checkpoints"
    shutil.copytree(COMMITTED_FIXTURE, src)
    (tmp_path / "tokenizers").mkdir()
    shutil.copy(small_tokenizer_json, tmp_path / "tokenizers" / "neox_tok.json")
    _with_yaml_lines(src, '"tokenizer_type": "HFTokenizer"', '"vocab-file": "./tokenizers/neox_tok.json"')
    out = tmp_path / "out"
    assert _merge(src, out)["tokenizer"] == "neox_tok.json (vocab-file of the config)"
    assert (out / "tokenizer.json").read_bytes() == small_tokenizer_json.read_bytes()


def test_vocab_file_found_by_name_next_to_the_configs(small_tokenizer_json, tmp_path):
    """An absolute vocab-file of the training machine: its name next to the checkpoint's configs."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    shutil.copy(small_tokenizer_json, src / "configs" / "my_tokenizer.json")
    _with_yaml_lines(src, '"vocab-file": "/cluster/home/someone/data/my_tokenizer.json"')
    assert _merge(src, tmp_path / "out")["tokenizer"] == "my_tokenizer.json (vocab-file of the config)"


def test_missing_vocab_file_is_refused_unless_given(small_tokenizer_json, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    _with_yaml_lines(src, '"tokenizer_type": "HFTokenizer"', '"vocab-file": "./data/missing_tokenizer.json"')
    result = cli("merge", src, tmp_path / "out")
    line = one_line_error(result, 4, "vocab-file", "missing_tokenizer.json", "--tokenizer")
    assert "HFTokenizer" in line
    # --tokenizer overrides the config
    assert _merge(src, tmp_path / "out", "--tokenizer", small_tokenizer_json)["tokenizer"] == \
        "tokenizer.json (--tokenizer)"
    # inspect still describes the checkpoint
    assert cli("inspect", src).exit_code == 0


@pytest.mark.skipif(REAL_TOKENIZER is None, reason="the GPT-NeoX-20B tokenizer is not in ../shared/data")
def test_real_20b_layout(neox_checkpoint, tmp_path):
    """The release's own layout: 20B_checkpoints/ with configs naming ./20B_checkpoints/20B_tokenizer.json."""
    ckpt = neox_checkpoint(tokenizer=REAL_TOKENIZER)
    src = tmp_path / "20B_checkpoints"
    shutil.copytree(ckpt.root, src)
    assert '"vocab-file": "./20B_checkpoints/20B_tokenizer.json"' in next((src / "configs").glob("*.yml")).read_text()
    out = tmp_path / "out"
    assert _merge(src, out)["tokenizer"] == "20B_tokenizer.json (vocab-file of the config)"
    assert (out / "tokenizer.json").read_bytes() == REAL_TOKENIZER.read_bytes()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
