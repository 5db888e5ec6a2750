"""The ``neoxconv`` command: a thin shell over the library. Library errors become one line + exit code."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from neoxconv import __version__
from neoxconv.errors import NeoXConvError, VerificationError
from neoxconv.progress import terminal_text

log = logging.getLogger("neoxconv")
EXIT_INTERRUPTED = 130


def _run(fn):
    """Turn library errors into ``neoxconv: error: ...`` on stderr and the error's exit code.

    The message is one line whatever it quotes: names from input files (an index, a manifest, a config) are
    escaped by `terminal_text`, so they can neither forge a second line nor send a terminal escape sequence."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except NeoXConvError as e:
            if debug:
                raise
            click.echo(f"neoxconv: error: {terminal_text(str(e))}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("neoxconv: interrupted; re-run the same command to resume where it stopped", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a bug of ours: still one line, the traceback with --debug
            if debug:
                raise
            click.echo(f"neoxconv: internal error: {type(e).__name__}: {terminal_text(str(e))} "
                       "(re-run with --debug for the traceback, and please report it)", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="neoxconv")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logging.")
def main(debug: bool) -> None:
    """Merge tensor-parallel GPT-NeoX checkpoints (e.g. GPT-NeoX-20B) into one Hugging Face model.

    \b
    Typical use:
      neoxconv inspect ./20B_checkpoints          # what is there, nothing written
      neoxconv merge ./20B_checkpoints ./neox-20b # streamed, resumable, verified on write
      neoxconv demo                               # the whole flow on a tiny synthetic model
    """
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLineFormatter("neoxconv: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])


class _OneLineFormatter(logging.Formatter):
    """Log lines (warnings naming source keys and files) escaped as the error line is (`terminal_text`); a
    traceback under --debug stays as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return terminal_text(super().formatMessage(record))


_dtype_choice = click.Choice(["auto", "fp16", "bf16", "fp32"], case_sensitive=False)
_row_bias_choice = click.Choice(["auto", "sum", "replicated"])
_qkv_layout_choice = click.Choice(["auto", "blocked", "interleaved"])


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dtype", type=_dtype_choice, default="auto", show_default=True,
              help="Output dtype; auto keeps the checkpoint's own (fp16 for 20B).")
@click.option("--row-bias", type=_row_bias_choice, default="auto", show_default=True,
              help="Row-parallel biases (attention.dense, mlp.dense_4h_to_h): sum the ranks' parts (NeoX with "
                   "gpt_j_residual) or check-and-keep-one; auto follows the config. Use 'replicated' for "
                   "checkpoints converted from Hugging Face by older gpt-neox tools (full bias on every rank).")
@click.option("--qkv-layout", type=_qkv_layout_choice, default="auto", show_default=True,
              help="Llama-style models with grouped-query attention: each rank's query_key_value rows as [Q|K|V] "
                   "blocks (gpt-neox since 2024-11) or interleaved per query head (2024-02..2024-11). auto: "
                   "interleaved for mlp.w1/w2/w3 checkpoints, else blocked (with a warning).")
@click.option("--replica-tolerance", type=float, default=1e-2, show_default=True,
              help="Largest |rank_k - rank_0| accepted for tensors every rank should hold identically (norms).")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="NeoX YAML (or Hugging Face config.json) of the model; default: configs/*.yml next to SRC.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              help="tokenizer.json to copy into OUT; default: *tokenizer*.json next to SRC.")
@click.option("--no-tokenizer", is_flag=True,
              help="Do not write the tokenizer into OUT (it is still found and checked: its bos/eos ids go to "
                   "config.json), as gpt-neox's converter's --no_save_tokenizer.")
@click.option("--pad-token-id", type=click.IntRange(min=0),
              help="The padding token's id, written to config.json and tokenizer_config.json (and so "
                   "generation_config.json). Required for reward models (train_impl: rm).")
@click.option("--allow-nonfinite", is_flag=True, help="Warn instead of failing on inf/nan weights.")
@click.option("--no-resume", is_flag=True,
              help="Redo every layer even if OUT holds completed ones (also over a merge made with other options).")
@click.option("--force", is_flag=True,
              help="Write into a non-empty OUT that is not this source's output (only neoxconv's files are replaced).")
@click.option("--hash", "hash_algo", type=click.Choice(["blake3", "sha256"]), default="blake3", show_default=True,
              help="Digest recorded for every output file in the manifest; sha256 matches Hugging Face Hub LFS ids, "
                   "BLAKE3 costs ~4x less CPU.")
@click.option("--license", "license_id", default="other", show_default=True,
              help="The model card's license: a Hugging Face license id (apache-2.0, mit, llama2, ...).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout (out, files_written, bytes_written, seconds, dtype, ...); "
                   "progress stays on stderr.")
@_run
def merge(src: Path, out: Path, dtype: str, row_bias: str, qkv_layout: str, replica_tolerance: float,
          config_path: Path | None, tokenizer_path: Path | None, no_tokenizer: bool, pad_token_id: int | None,
          allow_nonfinite: bool, no_resume: bool, force: bool, hash_algo: str, license_id: str, quiet: bool,
          as_json: bool) -> None:
    """Merge the tensor-parallel checkpoint SRC into a Hugging Face folder OUT.

    SRC is a checkpoint root (with 'latest' or one global_step* folder) or a global_step* folder, in the
    pipeline layout (layer_XX-model_YY-model_states.pt) or the sequential one (mp_rank_XX_model_states.pt),
    any TP degree. OUT gets one safetensors file per source layer, model.safetensors.index.json,
    config.json, generation_config.json, the tokenizer, a model card (README.md, yours to edit: a re-run keeps
    your edits) and a manifest (neoxconv.json). An interrupted merge resumes when re-run.
    """
    if "numpy" not in sys.modules:  # a fresh process: the merge does no linear algebra, and numpy's OpenBLAS
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # threads would spin at import (0.07 core-s)
    from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint

    options = MergeOptions(dtype=dtype, row_bias=row_bias, qkv_layout=qkv_layout, replica_tolerance=replica_tolerance,
                           allow_nonfinite=allow_nonfinite, config_path=config_path, tokenizer_path=tokenizer_path,
                           resume=not no_resume, force=force, quiet=quiet, hash=hash_algo, pad_token_id=pad_token_id,
                           license=license_id, save_tokenizer=not no_tokenizer)
    report = merge_checkpoint(src, out, options)
    if as_json:
        click.echo(json.dumps(report.to_json()))
    elif not quiet:
        click.echo(report.summary())


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="NeoX YAML (or config.json) of the model; default: configs/*.yml next to SRC.")
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False),
              help="Where the merge will write: report the free disk space there.")
@click.option("--dtype", type=_dtype_choice, default="auto", show_default=True,
              help="Plan for this merge --dtype (output dtype and bytes).")
@click.option("--row-bias", type=_row_bias_choice, default="auto", show_default=True,
              help="Plan for this merge --row-bias.")
@click.option("--qkv-layout", type=_qkv_layout_choice, default="auto", show_default=True,
              help="Plan for this merge --qkv-layout (Llama-style models with grouped-query attention).")
@click.option("--summary", is_flag=True,
              help="The plan as one line per layer kind (layers, tensors, bytes, rules) instead of every tensor; "
                   "with --json, 'tensors' is left out ('plan_summary' is always there).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_run
def inspect(src: Path, config_path: Path | None, out: Path | None, dtype: str, row_bias: str, qkv_layout: str,
            summary: bool, as_json: bool) -> None:
    """Describe the checkpoint SRC and the merge plan, without reading tensor data.

    Shows the model's shape, dtype and parameter count, the files found and missing, and the plan: every
    merged tensor (name, shape, dtype, rule) and the bytes the merge will write (--summary: one line per layer
    kind). Exits 4 when rank files are missing (after printing what was found).
    """
    from neoxconv.errors import CheckpointError
    from neoxconv.output.describe import format_inspect, inspect_checkpoint

    info = inspect_checkpoint(src, config_path=config_path, out=out, dtype=dtype, row_bias=row_bias,
                              qkv_layout=qkv_layout)
    if as_json:
        click.echo(json.dumps({k: v for k, v in info.items() if not (summary and k == "tensors")}, indent=2))
    else:
        click.echo(format_inspect(info, summary=summary))
    missing, count = info["files_missing"], info["files_missing_count"]  # the first few, and how many
    if missing:
        raise CheckpointError(f"{info['step_dir']}: {count} rank file(s) missing: {', '.join(missing[:8])}"
                              + (f" and {count - 8} more" if count > 8 else "")
                              + "; a merge needs every rank's file of every layer")


def _parse_ids(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    items = value.replace(" ", "").split(",")
    if "" in items:  # "1,,2" or "1,2,": a lost id, never silently dropped
        raise click.BadParameter(f"--ids {value!r} has an empty item; expected comma-separated token ids, "
                                 "e.g. 12092,1533")
    try:
        return tuple(int(v) for v in items)
    except ValueError:
        raise click.BadParameter("expected comma-separated token ids, e.g. 12092,1533") from None


def _finite_nonnegative(param, value: float) -> float:
    if not 0 <= value < float("inf"):  # nan fails too
        raise click.BadParameter(f"{value} is not a finite number >= 0", param=param)
    return value


def _parse_max_memory(ctx, param, value: str | None):
    if value is None:
        return None
    from neoxconv.runtime.placement import parse_max_memory

    try:
        return parse_max_memory(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@main.command()
@click.argument("out", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--prompt", help="Text to continue (needs OUT/tokenizer.json or --tokenizer).")
@click.option("--text", "text_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Also measure the model's perplexity on this text file (with --against / --reference hf: the "
                   "same on the simulated tensor-parallel forward / transformers, which must agree). Without "
                   "--prompt/--ids its first tokens are the prompt.")
@click.option("--window", type=click.IntRange(min=2),
              help="Perplexity window in tokens (default and most: max_position_embeddings).")
@click.option("--stride", type=click.IntRange(min=1),
              help="Tokens between window starts (default window - 1: every token but the first scored once, "
                   "with the context of its window).")
@click.option("--ids", "ids_text", help="The prompt as comma-separated token ids instead of text.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=32, show_default=True,
              help="Tokens to generate (stops at EOS).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto = cuda when available.")
@click.option("--dtype", type=_dtype_choice, default="auto", show_default=True,
              help="auto = fp16 on cuda, fp32 on cpu.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              help="tokenizer.json (default: OUT/tokenizer.json).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k most likely tokens (0 = all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--against", type=click.Path(path_type=Path, exists=True),
              help="The unmerged checkpoint: compare with a simulated tensor-parallel forward over its rank shards.")
@click.option("--against-config", type=click.Path(path_type=Path, dir_okay=False),
              help="Config for --against when it is not next to that checkpoint.")
@click.option("--row-bias", type=_row_bias_choice, default="auto", show_default=True,
              help="How the --against simulation applies row-parallel biases (auto follows the config).")
@click.option("--qkv-layout", type=_qkv_layout_choice, default="auto", show_default=True,
              help="How the --against simulation reads grouped-query QKV rows (Llama-style; as for merge).")
@click.option("--reference", type=click.Choice(["hf"]),
              help="Also compare with transformers (GPTNeoXForCausalLM or LlamaForCausalLM).")
@click.option("--int8", is_flag=True, help="Also run LLM.int8 (bitsandbytes) and compare it with full precision.")
@click.option("--int8-threshold", type=float, callback=lambda ctx, param, v: _finite_nonnegative(param, v), default=6.0,
              show_default=True, help="LLM.int8 outlier threshold.")
@click.option("--check-hashes/--no-check-hashes", default=None,
              help="Check every file's hash (BLAKE3 or sha256, as the manifest records) against the manifest "
                   "(default: on for models under 2 GB).")
@click.option("--no-manifest", is_flag=True,
              help="Accept a folder without neoxconv.json (not written by neoxconv): only headers are checked.")
@click.option("--attention", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
              help="eager: fp32 scores (the reference); sdpa: torch's fused attention kernel.")
@click.option("--max-memory", callback=_parse_max_memory, metavar="SIZE|DEV=SIZE,...",
              help="Keep at most SIZE of weights resident on the compute device (e.g. 512MiB, 20GB); the rest is "
                   "streamed from the safetensors files a module at a time. Per device: 0=20GB,1=20GB,cpu=30GB. "
                   "Default: everything resident when it fits, else a cap picked from the free memory.")
@click.option("--device-map", type=click.Choice(["auto", "balanced", "sequential"]),
              help="Spread the layers over every GPU, then CPU RAM, then disk (accelerate). With --device cpu: CPU "
                   "and disk only; otherwise the first GPU is the main device.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_run
def verify(out: Path, prompt: str | None, text_path: Path | None, window: int | None, stride: int | None,
           ids_text: str | None, max_new_tokens: int, device: str, dtype: str,
           tokenizer_path: Path | None, temperature: float, top_k: int, top_p: float, seed: int,
           against: Path | None, against_config: Path | None, row_bias: str, qkv_layout: str, reference: str | None,
           int8: bool, int8_threshold: float, check_hashes: bool | None, no_manifest: bool, attention: str,
           max_memory, device_map: str | None, as_json: bool, quiet: bool) -> None:
    """Load the merged folder OUT into neoxconv's own layers, generate, and check the conversion.

    \b
    Checks (exit code 7 when one fails its tolerance):
      integrity     files present, sizes and hashes as in the manifest, headers agree with config.json
      kv_cache      cached step-by-step logits vs one uncached forward over the same tokens
      sanity        logits finite and not constant
      against       with --against SRC: vs a simulated tensor-parallel forward over the unmerged shards
      reference_hf  with --reference hf: vs transformers' GPTNeoXForCausalLM / LlamaForCausalLM / Mistral...
      int8_*        with --int8: LLM.int8 top-1 agreement and weight memory
      perplexity_*  with --text FILE and --against / --reference hf: the perplexities agree
    Reward models (*ForSequenceClassification) are scored instead of generating: the score of the last
    non-pad token, checked the same ways.
    """
    from neoxconv.model.generation import Sampling
    from neoxconv.verify import VerifyOptions, format_report, report_json, verify_model

    try:
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    options = VerifyOptions(
        prompt=prompt, ids=_parse_ids(ids_text), text=text_path, window=window, stride=stride,
        max_new_tokens=max_new_tokens, device=device, dtype=dtype,
        tokenizer=tokenizer_path, sampling=sampling, against=against, against_config=against_config,
        row_bias=row_bias, qkv_layout=qkv_layout, reference=reference, int8=int8, int8_threshold=int8_threshold,
        check_hashes=check_hashes, require_manifest=not no_manifest, attention=attention, quiet=quiet or as_json,
        max_memory=max_memory,
        device_map=device_map,
    )
    report = verify_model(out, options)
    click.echo(report_json(report) if as_json else format_report(report))
    if not report.ok:
        sys.exit(VerificationError.exit_code)


_layout_choice = click.Choice(["pipeline", "sequential"])


def _neox_output_options(fn):
    """--allow-nonfinite, --no-resume, --force, --json and --quiet of the commands that write a gpt-neox checkpoint."""
    for option in reversed([
        click.option("--allow-nonfinite", is_flag=True, help="Warn instead of failing on inf/nan weights."),
        click.option("--no-resume", is_flag=True, help="Redo every file even if OUT holds completed ones."),
        click.option("--force", is_flag=True, help="Write into a non-empty OUT (only neoxconv's files are replaced)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object (implies no progress bar)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary."),
    ]):
        fn = option(fn)
    return fn


def _print_neox_report(report, as_json: bool, quiet: bool) -> None:
    from neoxconv.output.neox import NeoXOutputPlan

    if isinstance(report, NeoXOutputPlan):  # --dry-run: what would be written (printed even with --quiet)
        click.echo(json.dumps(report.as_dict()) if as_json else
                   "\n".join(terminal_text(line) for line in report.summary().splitlines()))
        return
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    elif not quiet:
        click.echo(f"wrote TP={report.tp_degree} ({report.layout}, global_step{report.step}, {report.dtype}) -> "
                   f"{report.out_dir}: {report.files_written} file(s) written ({report.bytes_written / 1e9:.3f} GB "
                   f"in {report.seconds:.1f} s), {report.files_reused} reused; row-parallel biases: {report.row_bias}; "
                   f"make_vocab_size_divisible_by {report.make_vocab_size_divisible_by}")


@main.command()
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tp", type=click.IntRange(min=1), required=True,
              help="Tensor-parallel degree (gpt-neox model-parallel-size).")
@click.option("--layout", type=_layout_choice,
              help="pipeline: layer_XX-model_YY files (pipe-parallel-size >= 1; the default); sequential: mp_rank_XX "
                   "files only (pipe-parallel-size 0; the default for reward models, which gpt-neox trains so).")
@click.option("--dtype", type=_dtype_choice, default="auto", show_default=True, help="auto keeps the weights' own.")
@click.option("--step", type=int, default=0, show_default=True, help="Writes global_step{STEP} and 'latest'.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              help="tokenizer.json to copy (default: HF_DIR/tokenizer.json).")
@click.option("--key-names", type=click.Choice(["current", "20b"]), default="current", show_default=True,
              help="current: mlp.linear1/linear2 (gpt-neox since 2024-09), no rotary inv_freq buffer; 20b: "
                   "mlp.dense_h_to_4h/dense_4h_to_h (Llama-style: mlp.w1/w2/w3 of mlp_type llama) and, for "
                   "GPT-NeoX, the inv_freq buffer in every block file, for gpt-neox before 2024-09.")
@click.option("--dry-run", is_flag=True,
              help="Only list the files, their bytes and the free disk at OUT; write nothing.")
@_neox_output_options
@_run
def split(hf_dir: Path, out: Path, tp: int, layout: str | None, dtype: str, step: int, tokenizer_path: Path | None,
          key_names: str, dry_run: bool, allow_nonfinite: bool, no_resume: bool, force: bool, as_json: bool,
          quiet: bool) -> None:
    """Split the Hugging Face GPT-NeoX, Llama or Mistral model HF_DIR into a gpt-neox checkpoint OUT at TP degree --tp.

    A *ForSequenceClassification folder with one label is a reward model: written with train_impl rm (rm_linear),
    in the sequential layout (gpt-neox trains reward models with pipe-parallel-size 0).

    OUT gets latest, global_step*/ (rank files and DeepSpeed bookkeeping), configs/neox.yml and the
    tokenizer. Row-parallel biases with parallel residual go whole to rank 0 (zeros elsewhere), so the
    ranks' parts sum to the bias exactly. Load it in gpt-neox with 'finetune: true' (see the README).
    """
    from neoxconv.output.split import SplitOptions, split_model

    options = SplitOptions(tp=tp, layout=layout, dtype=dtype, step=step, tokenizer_path=tokenizer_path,
                           key_names=key_names, dry_run=dry_run, allow_nonfinite=allow_nonfinite, resume=not no_resume,
                           force=force, quiet=quiet or as_json)
    _print_neox_report(split_model(hf_dir, out, options), as_json, quiet)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tp", type=click.IntRange(min=1), required=True, help="The new tensor-parallel degree.")
@click.option("--layout", type=_layout_choice,
              help="Output layout (default: the source's; sequential for reward models, which gpt-neox trains so).")
@click.option("--dtype", type=_dtype_choice, default="auto", show_default=True, help="auto keeps the checkpoint's own.")
@click.option("--step", type=int, help="Output step (default: the source's global_step number).")
@click.option("--row-bias", type=_row_bias_choice, default="auto", show_default=True,
              help="How the SOURCE's row-parallel biases combine (as in merge).")
@click.option("--qkv-layout", type=_qkv_layout_choice, default="auto", show_default=True,
              help="Llama-style GQA sources: how their QKV rows lie (as in merge); OUT keeps that layout.")
@click.option("--replica-tolerance", type=float, default=1e-2, show_default=True,
              help="Largest |rank_k - rank_0| accepted for replicated tensors of the source.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="NeoX YAML of the source; default: configs/*.yml next to SRC.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              help="tokenizer.json to copy; default: *tokenizer*.json next to SRC.")
@click.option("--dry-run", is_flag=True,
              help="Only list the files, their bytes and the free disk at OUT; write nothing.")
@_neox_output_options
@_run
def reshard(src: Path, out: Path, tp: int, layout: str | None, dtype: str, step: int | None, row_bias: str,
            qkv_layout: str, replica_tolerance: float, config_path: Path | None, tokenizer_path: Path | None,
            dry_run: bool, allow_nonfinite: bool, no_resume: bool, force: bool, as_json: bool, quiet: bool) -> None:
    """Reshard the gpt-neox checkpoint SRC (any TP degree) to TP degree --tp in OUT, one layer at a time."""
    from neoxconv.output.reshard import ReshardOptions, reshard_checkpoint

    options = ReshardOptions(tp=tp, layout=layout, dtype=dtype, step=step, row_bias=row_bias, qkv_layout=qkv_layout,
                             replica_tolerance=replica_tolerance, config_path=config_path,
                             tokenizer_path=tokenizer_path, dry_run=dry_run, allow_nonfinite=allow_nonfinite,
                             resume=not no_resume,
                             force=force,
                             quiet=quiet or as_json)
    _print_neox_report(reshard_checkpoint(src, out, options), as_json, quiet)


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the demo files here (default: a temporary folder, removed afterwards).")
@click.option("--tp", "tp_degree", type=int, default=2, show_default=True, help="Tensor-parallel degree of the demo.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              help="A tokenizer.json for the demo (default: the 20B tokenizer if found, else token ids).")
@_run
def demo(workdir: Path | None, tp_degree: int, tokenizer_path: Path | None) -> None:
    """Build a tiny synthetic GPT-NeoX-20B-layout checkpoint, merge it, inspect it, verify it."""
    from neoxconv.tools.demo import run_demo

    run_demo(workdir=workdir, tp_degree=tp_degree, tokenizer=tokenizer_path, echo=click.echo)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tp", "tp_degree", type=int, default=2, show_default=True,
              help="Tensor-parallel degree (rank files per layer).")
@click.option("--layers", type=int, default=4, show_default=True, help="Transformer blocks (num-layers).")
@click.option("--hidden", type=int, default=1024, show_default=True, help="Hidden size.")
@click.option("--heads", type=int,
              help="Attention heads (default: head width as the released models: 64 below hidden 2048, 128 from "
                   "2048, 96 at 6144 = 64 heads as GPT-NeoX-20B).")
@click.option("--ffn", type=int, help="MLP width (default: 4 x hidden).")
@click.option("--vocab", type=int, default=50432, show_default=True,
              help="Padded vocabulary rows (50432 fits the 20B tokenizer).")
@click.option("--max-positions", type=int, default=2048, show_default=True, help="max-position-embeddings.")
@click.option("--rotary-pct", type=float, default=0.25, show_default=True, help="Share of each head RoPE rotates.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True,
              help="Storage dtype of the rank files.")
@click.option("--layout", type=_layout_choice, default="pipeline", show_default=True,
              help="pipeline: layer_XX-model_YY-model_states.pt (20B); sequential: mp_rank_XX_model_states.pt.")
@click.option("--sequential-residual", is_flag=True, help="gpt_j_residual false (row-parallel biases replicated).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A tokenizer.json to place next to the checkpoint (as 20B_tokenizer.json).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (out, step_dir, parameters, bytes, files and the model's shape).")
@_run
def synth(out: Path, tp_degree: int, layers: int, hidden: int, heads: int | None, ffn: int | None, vocab: int,
          max_positions: int, rotary_pct: float, dtype: str, layout: str, sequential_residual: bool, seed: int,
          tokenizer_path: Path | None, as_json: bool) -> None:
    """Write a random GPT-NeoX checkpoint of a chosen size to OUT, in the real file layout.

    For trying neoxconv and for bug reports: e.g. 'neoxconv synth ./ckpt --tp 2 --layers 4 --hidden 1024',
    then 'neoxconv merge ./ckpt ./merged'. The weights are random; the files, config YAML and key names are
    those of a GPT-NeoX-20B release (one layer in memory at a time while writing).
    """
    from neoxconv.config import GELU_TANH, NeoXConfig
    from neoxconv.errors import ConfigError, UsageError
    from neoxconv.progress import format_bytes
    from neoxconv.tools.synthetic import SyntheticSpec, default_heads, synthesize

    try:
        config = NeoXConfig(num_layers=layers, hidden_size=hidden,
                            num_heads=heads if heads is not None else default_heads(hidden),
                            vocab_size=vocab, intermediate_size=ffn, max_position_embeddings=max_positions,
                            rotary_pct=rotary_pct, parallel_residual=not sequential_residual, activation=GELU_TANH)
    except ConfigError as e:
        raise UsageError(f"{e} (--layers/--hidden/--heads/--ffn/--vocab/--rotary-pct)") from None
    if tokenizer_path is not None:
        from neoxconv.source.tokenizer import token_count

        tokens = token_count(tokenizer_path)
        if tokens is not None and tokens > vocab:
            raise UsageError(f"{tokenizer_path}: has {tokens} tokens, more than --vocab {vocab}; raise --vocab "
                             "(50432 fits the 20B tokenizer)")
    spec = SyntheticSpec(config, tp_degree=tp_degree, layout=layout, dtype={"fp16": "float16", "bf16": "bfloat16",
                         "fp32": "float32"}[dtype], seed=seed, tokenizer=tokenizer_path)
    info = synthesize(out, spec)
    if as_json:
        click.echo(json.dumps(info.to_json()))
        return
    click.echo(f"wrote a synthetic TP={tp_degree} {dtype} checkpoint ({layout} layout, "
               f"{layers} layer{'s' if layers != 1 else ''}, hidden {hidden}, "
               f"{config.num_heads} heads, vocab {vocab}): {info.parameters:,} parameters, "
               f"{format_bytes(info.bytes)} in {info.files} files under {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
