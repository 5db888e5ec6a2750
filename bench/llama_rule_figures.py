"""The relative logit error of a correct Llama-style merge and of each wrong rule the tests catch.

    python bench/llama_rule_figures.py

For each case: a random transformers LlamaForCausalLM split into gpt-neox's layout (tests/llama_checkpoints.py),
merged (with the wrong rule patched in, as tests/test_llama.py does), loaded by transformers, and compared on a
fixed prompt: max |merged - source| / max |source| over the logits.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    import pytest

    sys.path.insert(0, str(REPO / "tests"))
    import test_llama as t

    from neoxconv import config as config_mod
    from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint

    from llama_checkpoints import write_llama_checkpoint

    cases = {"correct, GQA TP=2 fp32": (t.GQA_TP2, lambda m: None),
             "correct, MHA TP=4 fp16 (biases)": (t.MHA_TP4, lambda m: None),
             **t.WRONG_RULES,
             "RMSNorm eps 1e-6 instead of 1e-8": (t.GQA_TP2, lambda m: m.setattr(config_mod, "NEOX_RMSNORM_EPS", 1e-6))}
    mp = pytest.MonkeyPatch()
    for name, (spec, patch) in cases.items():
        d = Path(tempfile.mkdtemp(prefix="neoxconv-llama-rules-"))
        hf = write_llama_checkpoint(d / "src", spec)
        with mp.context() as m:
            patch(m)
            merge_checkpoint(d / "src", d / "out", MergeOptions(quiet=True))
        err = t._rel(t._hf_logits(t._load(d / "out")), t._hf_logits(hf.float()))
        print(f"{name:36s} relative logit error {err:.3g}", flush=True)


if __name__ == "__main__":
    main()
