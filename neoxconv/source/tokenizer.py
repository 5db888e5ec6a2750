"""What merge, split and reshard need to know about a Hugging Face ``tokenizer.json``: read as JSON, and checked
with the ``tokenizers`` library (when installed) before it is copied into OUT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neoxconv.errors import CheckpointError

EOS_TEXT = "<|endoftext|>"


_MAX_BYTES = 256 << 20  # a tokenizer.json is a few MB (20B's: 2 MB)


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    """(the file's text, its JSON) after a bounded-size read and the shape checks."""
    try:
        size = Path(path).stat().st_size
        if size > _MAX_BYTES:
            raise CheckpointError(f"{path}: {size} bytes is implausibly large for a tokenizer.json")
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable tokenizer.json: {str(e)[:200]}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"{path}: not a Hugging Face tokenizer.json (no 'model' entry)")
    added = data.get("added_tokens")
    if not isinstance(data["model"], dict) or not (
            added is None or isinstance(added, list) and all(isinstance(t, dict) for t in added)):
        raise CheckpointError(f"{path}: not a Hugging Face tokenizer.json ('model' or 'added_tokens' malformed)")
    return text, data


def _load(path: Path) -> dict[str, Any]:
    return _read(path)[1]


def _token_count(data: dict[str, Any]) -> int | None:
    vocab = data["model"].get("vocab")
    ids = [v for v in (vocab.values() if isinstance(vocab, dict) else ()) if type(v) is int]
    ids += [t["id"] for t in data.get("added_tokens") or [] if type(t.get("id")) is int]
    return max(ids) + 1 if ids else None


def _eos_token_id(path: Path, data: dict[str, Any]) -> int | None:
    found = next((tok.get("id") for tok in data.get("added_tokens") or [] if tok.get("content") == EOS_TEXT), None)
    vocab = data["model"].get("vocab")
    if found is None and isinstance(vocab, dict):
        found = vocab.get(EOS_TEXT)
    if found is None:
        return None
    if type(found) is not int or not 0 <= found < 1 << 31:
        raise CheckpointError(f"{path}: the id of {EOS_TEXT!r} is {found!r:.40}, not a token id")
    return found


def token_count(path: Path) -> int | None:
    """Largest token id + 1 over the vocabulary and the added tokens (None when the file lists no ids)."""
    return _token_count(_load(path))


def eos_token_id(path: Path) -> int | None:
    """The id of ``<|endoftext|>`` (0 for GPT-NeoX-20B), from added_tokens or the vocabulary."""
    return _eos_token_id(path, _load(path))


def _library_check(path: Path, text: str) -> None:
    """Refuse a file that the ``tokenizers`` library (what transformers and ``verify`` load it with) cannot
    load; nothing to check when the library is not installed."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return
    try:
        Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001  (the library raises a bare Exception for every kind of bad file)
        raise CheckpointError(f"{path}: the tokenizers library cannot load this tokenizer.json: "
                              f"{str(e)[:200]}") from None


def token_content(path: Path, token_id: int) -> str | None:
    """The text of token ``token_id`` (an added token's content, or the vocabulary's entry), None if it has none."""
    data = _load(path)
    found = next((t.get("content") for t in data.get("added_tokens") or [] if t.get("id") == token_id), None)
    vocab = data["model"].get("vocab")
    if found is None and isinstance(vocab, dict):
        found = next((text for text, i in vocab.items() if i == token_id), None)
    return found if isinstance(found, str) else None


def checked_token_count(path: Path, rows: int | None) -> int | None:
    """`token_count`, after every check merge, split and reshard make of a tokenizer.json before copying it:
    readable and well formed, loadable by the tokenizers library, no more tokens than the embedding's ``rows``
    (None: unknown), a valid ``<|endoftext|>`` id."""
    text, data = _read(path)
    tokens = _token_count(data)
    if tokens is not None and rows is not None and tokens > rows:
        raise CheckpointError(f"{path}: has {tokens} tokens but the model's embedding has {rows} rows: "
                              "not this model's tokenizer; pass the right one with --tokenizer FILE")
    _eos_token_id(path, data)
    _library_check(path, text)
    return tokens


# GPT-NeoX takes no token_type_ids. Without this list transformers 4.x's PreTrainedTokenizerFast returns them
# and `model.generate(**tok(text, return_tensors="pt"))` fails; 5.x already leaves them out.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def tokenizer_config(path: Path, max_length: int) -> dict[str, Any]:
    """A minimal tokenizer_config.json that AutoTokenizer (transformers 4.x and 5.x) accepts.

    The class stays PreTrainedTokenizerFast, which uses tokenizer.json as written in both major versions
    (5.x's GPTNeoXTokenizer rebuilds the pipeline from vocab and merges with its own normalizer and
    pre-tokenizer, which is right for the 20B tokenizer but not for every tokenizer a checkpoint may ship);
    ``model_input_names`` keeps token_type_ids out.
    """
    has_eos = eos_token_id(path) is not None
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": MODEL_INPUT_NAMES,
                           "model_max_length": max_length}
    if has_eos:
        cfg.update(bos_token=EOS_TEXT, eos_token=EOS_TEXT, unk_token=EOS_TEXT)
    return cfg
