"""The files a Hugging Face Hub folder carries besides weights and config: the model card and the generation config.

* ``README.md``: YAML front matter (``library_name``, ``tags``, ``pipeline_tag``, ``license``) and a body with the
  provenance neoxconv knows (source layout, step, TP degree, key names, QKV layout, dtype, the checks that
  passed, neoxconv's version, the command). It is the user's to edit before uploading: the output folder records
  the hash of the card it wrote (`OutputFolder.hand_over`), a re-run keeps a card that differs from it, and
  ``verify`` does not count an edited card as tampering.
* ``generation_config.json``: the bos/eos/pad ids of config.json, so transformers does not guess them.

Nothing written here names an absolute local path: the command line is recorded with every absolute path (or
one climbing out with ``..``) reduced to its last name (`public_command`), and OUT as ``OUT``.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import yaml

from neoxconv import __version__
from neoxconv.errors import UsageError

CARD = "README.md"
GENERATION_CONFIG = "generation_config.json"
DEFAULT_LICENSE = "other"  # the Hub's id for "not one of the listed licenses": the user sets the real one
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")  # Hub license ids: apache-2.0, mit, cc-by-nc-4.0, llama2, other
_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_license(license_id: str) -> str:
    """A Hub license id (lowercase letters, digits, ``.``, ``+``, ``-``), else a UsageError: the value goes into
    the card's YAML front matter as it is."""
    if not isinstance(license_id, str) or not _LICENSE.fullmatch(license_id):
        raise UsageError(f"--license {license_id!r:.80}: not a Hugging Face license id (lowercase, e.g. apache-2.0, "
                         "mit, cc-by-nc-4.0, llama2, or other)")
    return license_id


def generation_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json from config.json's token ids: bos and eos, and pad when the config has one."""
    return {k: hf_config[k] for k in _GENERATION_KEYS if hf_config.get(k) is not None}


def _public_arg(arg: str) -> str:
    if arg.startswith("--") and "=" in arg:
        key, value = arg.split("=", 1)
        return f"{key}={_public_arg(value)}"
    if os.path.isabs(arg) or arg.startswith("~") or ".." in PurePath(arg).parts:
        return PurePath(arg).name or "."
    return arg


def public_command(argv: Sequence[str]) -> str:
    """A command line without absolute local paths (each reduced to its last name)."""
    return shlex.join(["neoxconv", *(_public_arg(str(a)) for a in argv)])


@dataclass(frozen=True)
class CardFacts:
    """What the card says about a merged model, all known to the merge (no path, no time, not OUT's name: the
    same merge writes the same card, wherever OUT is)."""

    architecture: str  # GPTNeoXForCausalLM | LlamaForCausalLM
    layout: str  # pipeline | sequential
    step: str  # the step folder's name, e.g. global_step150000
    tp_degree: int
    key_generation: str  # the source's key names, as the key table names their generation
    qkv_layout: str  # how the fused QKV rows were read
    row_bias: str  # sum | replicated
    dtype: str
    shape: str  # "44 layers, hidden 6144, 64 heads, 50432 vocabulary rows"
    tokenizer: str  # which tokenizer files, and how they were found
    checks: list[str] = field(default_factory=list)
    command: str = ""
    license: str = DEFAULT_LICENSE
    version: str = __version__


def model_card(facts: CardFacts) -> str:
    """README.md: Hub front matter, then the provenance and the checks."""
    tags = ["llama", "gpt-neox"] if facts.architecture.startswith("Llama") else ["gpt-neox"]
    front = yaml.safe_dump({"library_name": "transformers", "license": facts.license,
                            "tags": [*tags, "neoxconv", "text-generation"], "pipeline_tag": "text-generation"},
                           sort_keys=False, allow_unicode=True)
    rows = [("architecture", f"`{facts.architecture}`"), ("source", f"`{facts.step}`, {facts.layout} layout"),
            ("tensor-parallel degree", str(facts.tp_degree)), ("key names", facts.key_generation),
            ("QKV layout", facts.qkv_layout), ("row-parallel biases", facts.row_bias), ("dtype", facts.dtype),
            ("model", facts.shape), ("tokenizer", facts.tokenizer), ("converted by", f"neoxconv {facts.version}")]
    if facts.command:
        rows.append(("command", f"`{facts.command}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    checks = "\n".join(f"- {c}" for c in facts.checks) or "- (none recorded)"
    return f"""---
{front}---

# {facts.architecture} from `{facts.step}`

A {facts.architecture} model converted from a tensor-parallel GPT-NeoX (DeepSpeed) checkpoint by
neoxconv {facts.version}.

**Before uploading:** check `license` above (a Hub license id such as `apache-2.0`; `merge --license ID`
writes it), and say what the model is, what it was trained on and what it is for.
neoxconv keeps this card as you edit it when the same merge is run again, and `neoxconv verify` does not
count your edits as changes to the model.

## Provenance

| | |
|---|---|
{table}

## Checks passed during the conversion

{checks}

`neoxconv verify FOLDER --prompt TEXT` re-checks every file against `neoxconv.json` and generates with the model.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_HUB_ID")
tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_HUB_ID")
```
"""
