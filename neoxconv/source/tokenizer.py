"""What merge, split and reshard need to know about a tokenizer before it is carried into OUT.

A Hugging Face ``tokenizer.json`` is read as JSON and checked with the ``tokenizers`` library (when installed).
merge also carries the other kinds gpt-neox trains with (`TokenizerSource`): a SentencePiece ``tokenizer.model``
(SPMTokenizer; read here without the ``sentencepiece`` package, checked with it when installed, converted to a
tokenizer.json that provably encodes like it when transformers can) and a GPT-2 ``vocab.json`` + ``merges.txt``
(GPT2BPETokenizer / HFGPT2Tokenizer).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoxconv.errors import CheckpointError
from neoxconv.smallfile import read_json, read_small_bytes, read_small_text

log = logging.getLogger(__name__)

EOS_TEXT = "<|endoftext|>"


TOKENIZER_MAX_BYTES = 256_000_000  # a tokenizer.json is a few MB (20B's: 2 MB)


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    """(the file's text, its JSON) after a bounded-size read and the shape checks."""
    try:
        text = read_small_text(Path(path), CheckpointError, TOKENIZER_MAX_BYTES)
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


def hf_special_tokens(path: Path, tokens: int | None) -> TokenizerInfo:
    """The special tokens of a tokenizer.json, the one answer for OUT's tokenizer_config.json and config.json's ids:
    gpt-neox's ``<|endoftext|>`` as bos, eos and unk when the tokenizer has it; a Hugging Face tokenizer folder's own
    (`companion_settings`) instead where it names them (bos defaults to eos, as gpt-neox has it). A folder that
    names a bos but no eos the tokenizer has is refused: config.json's eos_token_id would be a guess."""
    data = _load(path)
    eot = EOS_TEXT if _eos_token_id(path, data) is not None else None
    carried = companion_settings(path)
    eos = carried.get("eos_token", eot)
    bos = carried.get("bos_token", eos)
    if bos is not None and eos is None:
        raise CheckpointError(f"{Path(path).parent / COMPANION}: names bos_token {bos!r} but no eos_token, and "
                              f"{Path(path).name} has no {EOS_TEXT!r}: config.json's eos_token_id cannot be told; add "
                              "eos_token to it")
    return TokenizerInfo(tokens=tokens, bos_id=_token_id(data, bos) if bos else None,
                         eos_id=_token_id(data, eos) if eos else None, bos_token=bos, eos_token=eos,
                         unk_token=carried.get("unk_token", eot), pad_token=carried.get("pad_token"))


def tokenizer_config(path: Path, max_length: int, info: TokenizerInfo) -> dict[str, Any]:
    """A minimal tokenizer_config.json that AutoTokenizer (transformers 4.x and 5.x) accepts.

    The class stays PreTrainedTokenizerFast, which uses tokenizer.json as written in both major versions
    (5.x's GPTNeoXTokenizer rebuilds the pipeline from vocab and merges with its own normalizer and
    pre-tokenizer, which is right for the 20B tokenizer but not for every tokenizer a checkpoint may ship);
    ``model_input_names`` keeps token_type_ids out. The special tokens, chat template and BOS/EOS settings of a
    Hugging Face tokenizer folder the tokenizer.json comes from are carried (`companion_settings`).
    """
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": MODEL_INPUT_NAMES,
                           "model_max_length": max_length}
    cfg.update({k: v for k, v in (("bos_token", info.bos_token), ("eos_token", info.eos_token),
                                  ("unk_token", info.unk_token), ("pad_token", info.pad_token)) if v is not None})
    cfg.update({k: v for k, v in companion_settings(path).items() if k not in _SPECIAL_TOKENS})  # template, flags
    return cfg


COMPANION = "tokenizer_config.json"  # of a Hugging Face tokenizer folder (what --vocab-is-hf-tokenizer loads upstream)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.50 saves a folder's chat template
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_FLAGS = ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces")
_MAX_TEMPLATE_BYTES = 1_000_000  # chat templates are a few kB


def companion_settings(path: Path) -> dict[str, Any]:
    """What a Hugging Face tokenizer folder says beside its tokenizer.json (``tokenizer_config.json``, and a
    ``chat_template.jinja``): the special tokens (as text; each must be a token of this tokenizer), the chat
    template and the BOS/EOS flags, as gpt-neox's converter keeps them when it loads the folder with AutoTokenizer
    (``--vocab-is-hf-tokenizer``). Empty when there is no such file, or the tokenizer is not named tokenizer.json
    (a standalone 20B_tokenizer.json). Anything else in the file (its class, its
    auto_map code) is not carried. A CheckpointError names the file when a value is malformed."""
    folder = Path(path).parent
    cfg_path, jinja = folder / COMPANION, folder / CHAT_TEMPLATE_FILE
    out: dict[str, Any] = {}
    if Path(path).name != HF_JSON:  # a folder's own file is tokenizer.json; 20B_tokenizer.json stands alone
        return out
    raw = read_json(cfg_path, CheckpointError, what=COMPANION) if cfg_path.is_file() else {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object ({COMPANION})")
    if not raw and not jinja.is_file():
        return out
    data = _load(path)
    for key in _SPECIAL_TOKENS:
        value = raw.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        if value is None:
            continue
        if not isinstance(text, str) or _token_id(data, text) is None:
            raise CheckpointError(f"{cfg_path}: {key} {str(text)[:60]!r} is not a token of {Path(path).name}; "
                                  "this is not that tokenizer's config (remove it, or pass the tokenizer's own folder)")
        out[key] = text
    for key in _FLAGS:
        if key in raw:
            if not isinstance(raw[key], bool):
                raise CheckpointError(f"{cfg_path}: {key} is {raw[key]!r:.40}, not true or false")
            out[key] = raw[key]
    template = raw.get("chat_template")
    if jinja.is_file():  # (transformers prefers the file to the key)
        try:
            template = read_small_text(jinja, CheckpointError, _MAX_TEMPLATE_BYTES)
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jinja}: not a readable chat template: {str(e)[:200]}") from None
    if template is not None:
        named = isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template)
        if not (isinstance(template, str) or named) or len(json.dumps(template)) > _MAX_TEMPLATE_BYTES:
            raise CheckpointError(f"{cfg_path}: chat_template is not a template (a string, or a list of "
                                  "{name, template}) under 1 MB")
        out["chat_template"] = template
    return out


def _token_id(data: dict[str, Any], text: str) -> int | None:
    """The id of the token ``text`` (an added token's, or the vocabulary's); None when there is none."""
    found = next((t.get("id") for t in data.get("added_tokens") or [] if t.get("content") == text), None)
    vocab = data["model"].get("vocab")
    if found is None and isinstance(vocab, dict):
        found = vocab.get(text)
    return found if type(found) is int else None


# ----- every kind of tokenizer gpt-neox trains with ---------------------------------------------------------------
# tokenizer_type -> kind: HFTokenizer reads a tokenizer.json; SPMTokenizer a SentencePiece model; GPT2BPETokenizer
# (vocab-file + merge-file) and HFGPT2Tokenizer (a folder with vocab.json and merges.txt) a GPT-2 byte-level BPE.
HF_JSON, SPM, GPT2_BPE = "tokenizer.json", "sentencepiece", "gpt2-bpe"
GIVEN = "--tokenizer"  # TokenizerSource.found_by of a tokenizer named on the command line


@dataclass(frozen=True)
class TokenizerSource:
    """The tokenizer of a checkpoint: its kind, its files (name in OUT -> source file, the main one first), and
    how it was found (for the log and the manifest: never an absolute path)."""

    kind: str  # HF_JSON | SPM | GPT2_BPE
    files: tuple[tuple[str, Path], ...]
    found_by: str  # "--tokenizer", "vocab-file of the config", "next to the checkpoint"

    @property
    def path(self) -> Path:
        return self.files[0][1]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def given(self) -> bool:
        """Named on the command line (``--tokenizer``), not found."""
        return self.found_by == GIVEN

    @property
    def json(self) -> Path | None:
        """The tokenizer.json file (HF_JSON), which split and reshard copy; None for the other kinds."""
        return self.path if self.kind == HF_JSON else None

    def describe(self) -> str:
        return f"{' + '.join(p.name for _, p in self.files)} ({self.found_by})"


@dataclass(frozen=True)
class TokenizerInfo:
    """What merge takes from a checked tokenizer: its size and special tokens."""

    tokens: int | None  # largest id + 1 (None: unknown)
    bos_id: int | None
    eos_id: int | None
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the tokenizer: {e.strerror or e}") from None


def tokenizer_source(path: Path, found_by: str, *, merges: Path | None = None) -> TokenizerSource:
    """The tokenizer in ``path``, its kind read from its content: a tokenizer.json, a GPT-2 vocab.json (with
    ``merges`` or the merges.txt beside it), or else a SentencePiece model (checked when it is read)."""
    path = Path(path)
    if path.is_dir():  # HFGPT2Tokenizer: a folder as GPT2TokenizerFast.from_pretrained reads it
        for name in ("tokenizer.json", "vocab.json"):
            if (path / name).is_file():
                return tokenizer_source(path / name, found_by)
        raise CheckpointError(f"{path}: a folder without tokenizer.json or vocab.json; pass the tokenizer file "
                              "with --tokenizer FILE")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tokenizer file")
    if not _head(path).lstrip().startswith((b"{", b"[")):  # not JSON text: read as a SentencePiece model
        return TokenizerSource(SPM, (("tokenizer.model", path),), found_by)
    try:
        data = json.loads(read_small_text(path, CheckpointError, TOKENIZER_MAX_BYTES))
    except (CheckpointError, OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        data = None  # (refused by name when it is read as the kind it looks like)
    if isinstance(data, dict) and "model" not in data and data and all(type(v) is int for v in data.values()):
        merges = Path(merges) if merges is not None else path.with_name("merges.txt")
        if not merges.is_file():
            raise CheckpointError(f"{path}: a GPT-2 vocab.json needs its merges.txt ({merges.name} not found "
                                  "beside it); pass the config's merge-file, or a tokenizer.json with --tokenizer")
        return TokenizerSource(GPT2_BPE, (("vocab.json", path), ("merges.txt", merges)), found_by)
    return TokenizerSource(HF_JSON, (("tokenizer.json", path),), found_by)  # checked as one when read


# ----- SentencePiece: a protobuf ModelProto, read without the sentencepiece package --------------------------------
_SPM_MAX = 64_000_000  # Llama's tokenizer.model is 0.5 MB; large multilingual ones a few MB
_SPM_DEFAULT_IDS = {40: 0, 41: 1, 42: 2, 43: -1}  # TrainerSpec unk_id, bos_id, eos_id, pad_id (sentencepiece's)
_SPM_DEFAULT_PIECES = {45: "<unk>", 46: "<s>", 47: "</s>", 48: "<pad>"}


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; bytes for length-delimited fields."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire} (field {number})")
        if i > len(data) or number == 0:
            raise ValueError("truncated message")
        out.append((number, wire, value))
    return out


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True)
class SpmModel:
    pieces: list[str]
    ids: dict[str, int]  # unk, bos, eos, pad (-1: none)
    special: dict[str, str]  # unk, bos, eos, pad piece texts


def read_spm(path: Path) -> SpmModel:
    """The pieces and special ids of a SentencePiece model; a CheckpointError naming the file when it is not one."""
    try:
        data = read_small_bytes(Path(path), CheckpointError, _SPM_MAX)
        pieces, ids, special = [], dict(_SPM_DEFAULT_IDS), dict(_SPM_DEFAULT_PIECES)
        for number, wire, value in _fields(data):
            if number == 1 and wire == 2:
                piece = [v for n, w, v in _fields(value) if n == 1 and w == 2]
                if len(piece) != 1:
                    raise ValueError("a piece without its text")
                pieces.append(piece[0].decode("utf-8"))
            elif number == 2 and wire == 2:
                for n, w, v in _fields(value):
                    if n in ids and w == 0:
                        ids[n] = _int32(v)
                    elif n in special and w == 2:
                        special[n] = v.decode("utf-8")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a SentencePiece model (tokenizer.model): {str(e)[:200]}; pass the "
                              "tokenizer the model was trained with, --tokenizer FILE") from None
    names = ("unk", "bos", "eos", "pad")
    out = SpmModel(pieces, dict(zip(names, (ids[n] for n in (40, 41, 42, 43)))),
                   dict(zip(names, (special[n] for n in (45, 46, 47, 48)))))
    bad = [f"{k}_id {v}" for k, v in out.ids.items() if not -1 <= v < len(pieces)]
    if not pieces or bad:
        raise CheckpointError(f"{path}: not a SentencePiece model (tokenizer.model): "
                              + (", ".join(bad) + f" outside its {len(pieces)} pieces" if bad else "no pieces"))
    return out


def _spm_library_check(path: Path) -> None:
    """Refuse a model the ``sentencepiece`` library cannot load (nothing to check without it)."""
    try:
        import sentencepiece
    except ImportError:
        return
    try:
        sentencepiece.SentencePieceProcessor(model_proto=read_small_bytes(Path(path), CheckpointError, _SPM_MAX))
    except Exception as e:  # noqa: BLE001  (it raises RuntimeError/OSError, varying by version)
        raise CheckpointError(f"{path}: the sentencepiece library cannot load this model: {str(e)[:200]}") from None


def _spm_info(path: Path) -> TokenizerInfo:
    model = read_spm(path)
    _spm_library_check(path)
    # gpt-neox's SentencePieceTokenizer ends documents with piece_to_id("<|endoftext|>") (the unk id when the
    # model has no such piece, as Llama's has not): its end of text; else the model's own eos
    eos = model.pieces.index(EOS_TEXT) if EOS_TEXT in model.pieces else model.ids["eos"]
    eos = eos if eos >= 0 else None
    bos = model.ids["bos"] if model.ids["bos"] >= 0 else eos
    unk = model.ids["unk"]
    return TokenizerInfo(tokens=len(model.pieces), bos_id=bos, eos_id=eos,
                         bos_token=None if bos is None else model.pieces[bos],
                         eos_token=None if eos is None else model.pieces[eos],
                         unk_token=model.pieces[unk] if unk >= 0 else None)


# ----- GPT-2 byte-level BPE (vocab.json + merges.txt) ----------------------------------------------------------
def _gpt2_parts(src: TokenizerSource) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab_path, merges_path = src.files[0][1], src.files[1][1]
    vocab = _load_vocab(vocab_path)
    try:
        lines = read_small_text(merges_path, CheckpointError, TOKENIZER_MAX_BYTES).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{merges_path}: not a readable merges.txt: {str(e)[:200]}") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{merges_path}: line {n} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def _load_vocab(path: Path) -> dict[str, int]:
    data = read_json(Path(path), CheckpointError, what="vocab.json", limit=TOKENIZER_MAX_BYTES)
    if not isinstance(data, dict) or not all(type(v) is int and 0 <= v < 1 << 31 for v in data.values()):
        raise CheckpointError(f"{path}: not a GPT-2 vocab.json (a {{token: id}} table)")
    return data


def _gpt2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The GPT-2 pipeline as transformers' GPT2TokenizerFast builds it (byte-level, no prefix space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if EOS_TEXT in vocab:
        tok.add_special_tokens([EOS_TEXT])
    return tok


def _gpt2_info(src: TokenizerSource) -> TokenizerInfo:
    vocab, merges = _gpt2_parts(src)
    try:
        _gpt2_tokenizer(vocab, merges)
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises a bare Exception)
        raise CheckpointError(f"{src.path}: the tokenizers library cannot build a BPE from it and "
                              f"{src.files[1][1].name}: {str(e)[:200]}") from None
    eos = vocab.get(EOS_TEXT)
    text = EOS_TEXT if eos is not None else None
    return TokenizerInfo(tokens=max(vocab.values()) + 1 if vocab else None, bos_id=eos, eos_id=eos, bos_token=text,
                         eos_token=text, unk_token=text)


# ----- what merge checks and writes ------------------------------------------------------------------------------
def check_tokenizer(src: TokenizerSource, rows: int | None) -> TokenizerInfo:
    """Every check merge makes of a tokenizer before carrying it: readable, loadable by its library, no more
    tokens than the embedding's ``rows``. Returns its size and special tokens."""
    if src.kind == HF_JSON:
        return hf_special_tokens(src.path, checked_token_count(src.path, rows))
    info = _spm_info(src.path) if src.kind == SPM else _gpt2_info(src)
    if info.tokens is not None and rows is not None and info.tokens > rows:
        raise CheckpointError(f"{src.path}: has {info.tokens} tokens but the model's embedding has {rows} rows: "
                              "not this model's tokenizer; pass the right one with --tokenizer FILE")
    return info


# texts a converted tokenizer.json must encode exactly as the SentencePiece model does before it is written
_PROBES = ("Hello world, the quick brown fox!", "  two  spaces  ", "tabs\tand\nnew lines\n\n", " leading", "trailing ",
           "numbers 12345 and 3.14159", "ünïcödé, 漢字 and an emoji 🙂", "a", "")


def _spm_probes(path: Path) -> list[str]:
    pieces = read_spm(path).pieces
    sample = " ".join(p.replace("\u2581", " ") for p in pieces[3::7][:300])
    return [*_PROBES, sample]


def spm_tokenizer_json(path: Path) -> bytes | None:
    """A tokenizer.json that encodes every probe text as the SentencePiece model does, converted by transformers
    (needs ``sentencepiece`` and ``protobuf``: ``pip install neoxconv[spm]``); None when it cannot be made so."""
    try:
        import sentencepiece
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer
    except ImportError as e:
        log.warning("%s: tokenizer.json not written (%s is not installed: pip install 'neoxconv[spm]'); "
                    "transformers converts tokenizer.model when it loads the folder", Path(path).name, e.name)
        return None
    import tempfile

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    probes = _spm_probes(path)
    # 5.x builds the fast tokenizer from the model's own normalizer settings for the generic class; 4.x converts
    # through LlamaTokenizerFast. Whichever encodes like SentencePiece is kept.
    for cls in ("PreTrainedTokenizerFast", "LlamaTokenizerFast"):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.model").write_bytes(read_small_bytes(Path(path), CheckpointError, _SPM_MAX))
            (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": cls, "add_bos_token": False, "add_eos_token": False}))
            try:
                text = AutoTokenizer.from_pretrained(tmp).backend_tokenizer.to_str()
                tok = Tokenizer.from_str(text)
            except Exception:  # noqa: BLE001  (any failure of a converter: try the next, else no tokenizer.json)
                continue
        if all(tok.encode(p, add_special_tokens=False).ids == sp.encode(p) for p in probes):
            return (text + "\n").encode()
    log.warning("%s: tokenizer.json not written: transformers' conversion does not encode like the SentencePiece "
                "model; transformers converts tokenizer.model when it loads the folder", Path(path).name)
    return None


def output_files(src: TokenizerSource, info: TokenizerInfo, max_length: int) -> dict[str, bytes]:
    """The tokenizer files of OUT: the source's files under the names transformers reads, tokenizer.json where it
    can be built, and a tokenizer_config.json naming a class that loads them (transformers 4.x and 5.x)."""
    try:  # (each was read and checked before, under the same bound: a file that grew since is refused)
        out = {name: read_small_bytes(path, CheckpointError, TOKENIZER_MAX_BYTES) for name, path in src.files}
    except OSError as e:
        raise CheckpointError(f"{e.filename}: cannot read: {e.strerror or e}") from None
    if src.kind == HF_JSON:
        out["tokenizer_config.json"] = _json(tokenizer_config(src.path, max_length, info))
        return out
    cfg: dict[str, Any] = {"model_input_names": MODEL_INPUT_NAMES, "model_max_length": max_length}
    cfg.update({k: v for k, v in (("bos_token", info.bos_token), ("eos_token", info.eos_token),
                                  ("unk_token", info.unk_token)) if v is not None})
    if src.kind == SPM:
        converted = spm_tokenizer_json(src.path)
        if converted is not None:
            out["tokenizer.json"] = converted
        # with tokenizer.json: the generic fast class loads it as written (5.x's LlamaTokenizer rebuilds its own
        # pipeline and encodes runs of spaces unlike SentencePiece); without: LlamaTokenizer converts the .model.
        # No BOS/EOS added: gpt-neox's SPMTokenizer trained on sp.encode(text) alone.
        cfg.update(tokenizer_class="PreTrainedTokenizerFast" if converted is not None else "LlamaTokenizer",
                   add_bos_token=False, add_eos_token=False)
    else:
        vocab, merges = _gpt2_parts(src)
        try:
            out["tokenizer.json"] = (_gpt2_tokenizer(vocab, merges).to_str() + "\n").encode()
        except ImportError:
            pass
        cfg.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=False)
    out["tokenizer_config.json"] = _json(cfg)
    return out


def _json(obj: Any) -> bytes:
    """As the output writer writes JSON (``json_bytes``): indented, strict."""
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()
