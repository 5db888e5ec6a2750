"""`neoxconv demo`: the whole flow on a tiny synthetic checkpoint built on the fly."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from neoxconv.errors import OutputError, VerificationError

DEMO_PROMPT = "The capital of France is"
DEMO_IDS = (510, 5347, 273, 6181, 310)  # the same prompt, tokenized by the 20B tokenizer
# where the demo looks for the real GPT-NeoX-20B tokenizer when none is given
TOKENIZER_CANDIDATES = ("20B_tokenizer.json", "../shared/data/20B_tokenizer.json", "shared/data/20B_tokenizer.json")


def find_demo_tokenizer(explicit: Path | None = None) -> Path | None:
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("NEOXCONV_TOKENIZER")
    candidates = ([env] if env else []) + list(TOKENIZER_CANDIDATES)
    for c in candidates:
        if Path(c).is_file():
            return Path(c)
    return None


def run_demo(*, workdir: Path | None = None, tp_degree: int = 2, tokenizer: Path | None = None,
             echo: Callable[[str], None] = print) -> None:
    """Synthesize -> inspect -> merge -> check every tensor -> verify (in a temporary folder by default)."""
    from neoxconv.tools.synthetic import SyntheticSpec, check_split, tiny_config

    check_split(SyntheticSpec(tiny_config(), tp_degree=tp_degree))  # a usage error before any folder is made
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="neoxconv-demo-") as tmp:
            echo(f"demo: working in {tmp} (a temporary folder, removed when the demo ends; "
                 "pass --workdir DIR to keep the files)")
            _demo(Path(tmp), tp_degree, tokenizer, echo)
            echo(f"demo: removed {tmp}; run 'neoxconv demo --workdir DIR' to keep the checkpoint and the merged model")
    else:
        work = Path(workdir)
        if work.is_symlink() or (work.exists() and (not work.is_dir() or any(work.iterdir()))):
            raise OutputError(_workdir_refusal(work))
        echo(f"demo: working in {work} (kept afterwards)")
        _demo(work, tp_degree, tokenizer, echo)
        echo(f"demo: files kept in {work}: {work / 'checkpoint'} (the synthetic TP={tp_degree} checkpoint), "
             f"{work / 'merged'} (the merged Hugging Face folder); try "
             f"'neoxconv inspect {work / 'checkpoint'}' or 'neoxconv verify {work / 'merged'} --ids 510,5347'")


def _workdir_refusal(work: Path) -> str:
    """Why ``--workdir`` is refused, and what to do: demo writes only into a new or empty folder, so that a run
    with other options (another --tp) never meets an earlier run's rank files."""
    if work.is_symlink() or not work.is_dir():
        return (f"{work}: exists and is {'a symlink' if work.is_symlink() else 'a file'}; demo writes only into a "
                "new or empty folder: choose another --workdir")
    if {p.name for p in work.iterdir()} <= {"checkpoint", "merged"}:
        return (f"{work}: is not empty: it holds an earlier demo's files (checkpoint/, merged/); demo writes only "
                "into a new or empty "
                f"folder, so that another run (e.g. another --tp) never mixes with them: remove them "
                f"(rm -r {work / 'checkpoint'} {work / 'merged'}) or choose another --workdir")
    return (f"{work}: exists and is not empty; demo writes only into a new or empty folder: choose another "
            "--workdir (nothing in this one was touched)")


def _demo(work: Path, tp_degree: int, tokenizer: Path | None, echo: Callable[[str], None]) -> None:
    from safetensors import safe_open

    from neoxconv.output.describe import inspect_checkpoint
    from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
    from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint

    tok = find_demo_tokenizer(tokenizer)
    if tok is None:
        echo("demo: no GPT-NeoX tokenizer found (set NEOXCONV_TOKENIZER or pass --tokenizer); "
             "continuing without one: prompts are token ids")
    else:
        echo(f"demo: using tokenizer {tok}")
    src, out = work / "checkpoint", work / "merged"
    spec = SyntheticSpec(tiny_config(), tp_degree=tp_degree, dtype="float16", tokenizer=tok)
    echo(f"demo: writing a synthetic TP={tp_degree} fp16 checkpoint in the 20B layout to {src}")
    reference = write_checkpoint(src, spec)

    info = inspect_checkpoint(src)
    echo(f"demo: inspect: TP={info['tp_degree']} {info['layout']}, {info['num_layers']} layers, hidden "
         f"{info['hidden_size']}, {info['num_heads']} heads, vocab {info['vocab_size']}, {info['dtype']}, "
         f"{info['parameters']:,} parameters, {len(info['files_found'])} files")

    report = merge_checkpoint(src, out, MergeOptions(quiet=True, force=True))
    echo(f"demo: merged -> {out} ({report.files_written} safetensors files, {report.total_bytes:,} bytes)")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    mismatched = []
    for name, file in index["weight_map"].items():
        with safe_open(out / file, framework="pt") as f:
            got = f.get_tensor(name)
        want = reference[name]
        if got.shape != want.shape or got.dtype != want.dtype or not bool((got == want).all()):
            mismatched.append(name)
    if mismatched:
        raise VerificationError(f"demo: merged tensors differ from the synthetic reference: {', '.join(mismatched)}")
    echo(f"demo: all {len(index['weight_map'])} merged tensors equal the reference model's, bit for bit")

    from neoxconv.verify import VerifyOptions, format_report, verify_model

    prompt = dict(prompt=DEMO_PROMPT) if tok is not None else dict(ids=DEMO_IDS)
    echo(f"demo: verify {out} --against {src} "
         + (f"--prompt {DEMO_PROMPT!r}" if tok is not None else f"--ids {','.join(map(str, DEMO_IDS))}"))
    report = verify_model(out, VerifyOptions(max_new_tokens=16, device="cpu", against=src, **prompt))
    echo(format_report(report))
    if not report.ok:
        raise VerificationError("demo: verify reported a failed check")
    echo("demo: done (the weights are random, so the generated text is gibberish; the checks are what matter)")
