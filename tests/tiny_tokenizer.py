"""A tiny word-level Hugging Face ``tokenizer.json`` (built with the ``tokenizers`` library), for tests that need
text in and out without the real GPT-NeoX-20B tokenizer: id 0 ``<|endoftext|>``, id 1 ``<|padding|>``, then
the words of a vocabulary."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|padding|>", "[UNK]"]


def write_tokenizer(path: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words) - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS[:2])
    tok.save(str(path))
    return path
