"""The ``neoxconv`` command: a thin shell over the library. Library errors become one line + exit code."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from neoxconv import __version__
from neoxconv.errors import NeoXConvError, VerificationError

log = logging.getLogger("neoxconv")
EXIT_INTERRUPTED = 130


def _run(fn):
    """Turn library errors into ``neoxconv: error: ...`` on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except NeoXConvError as e:
            if debug:
                raise
            click.echo(f"neoxconv: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("neoxconv: interrupted; re-run the same command to resume where it stopped", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a bug of ours: still one line, the traceback with --debug
            if debug:
                raise
            click.echo(f"neoxconv: internal error: {type(e).__name__}: {e} "
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
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="neoxconv: %(message)s")


_dtype_choice = click.Choice(["auto", "fp16", "bf16", "fp32"], case_sensitive=False)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dtype", type=_dtype_choice, default="auto", show_default=True,
              help="Output dtype; auto keeps the checkpoint's own (fp16 for 20B).")
@click.option("--row-bias", type=click.Choice(["auto", "sum", "replicated"]), default="auto", show_default=True,
              help="Row-parallel biases (attention.dense, mlp.dense_4h_to_h): sum the ranks' parts (NeoX with "
                   "gpt_j_residual) or check-and-keep-one; auto follows the config. Use 'replicated' for "
                   "checkpoints converted from Hugging Face by older gpt-neox tools (full bias on every rank).")
@click.option("--replica-tolerance", type=float, default=1e-2, show_default=True,
              help="Largest |rank_k - rank_0| accepted for tensors every rank should hold identically (norms).")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="NeoX YAML (or Hugging Face config.json) of the model; default: configs/*.yml next to SRC.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              help="tokenizer.json to copy into OUT; default: *tokenizer*.json next to SRC.")
@click.option("--allow-nonfinite", is_flag=True, help="Warn instead of failing on inf/nan weights.")
@click.option("--no-resume", is_flag=True, help="Redo every layer even if OUT holds completed ones.")
@click.option("--force", is_flag=True,
              help="Write into a non-empty OUT that is not this source's output (only neoxconv's files are replaced).")
@click.option("--hash", "hash_algo", type=click.Choice(["blake3", "sha256"]), default="blake3", show_default=True,
              help="Digest recorded for every output file in the manifest; sha256 matches Hugging Face Hub LFS ids, "
                   "BLAKE3 costs ~4x less CPU.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@_run
def merge(src: Path, out: Path, dtype: str, row_bias: str, replica_tolerance: float, config_path: Path | None,
          tokenizer_path: Path | None, allow_nonfinite: bool, no_resume: bool, force: bool, hash_algo: str,
          quiet: bool) -> None:
    """Merge the tensor-parallel checkpoint SRC into a Hugging Face folder OUT.

    SRC is a checkpoint root (with 'latest' or one global_step* folder) or a global_step* folder, in the
    pipeline layout (layer_XX-model_YY-model_states.pt) or the sequential one (mp_rank_XX_model_states.pt),
    any TP degree. OUT gets one safetensors file per source layer, model.safetensors.index.json,
    config.json, the tokenizer and a manifest (neoxconv.json). An interrupted merge resumes when re-run.
    """
    from neoxconv.convert import MergeOptions, merge_checkpoint

    options = MergeOptions(dtype=dtype, row_bias=row_bias, replica_tolerance=replica_tolerance,
                           allow_nonfinite=allow_nonfinite, config_path=config_path, tokenizer_path=tokenizer_path,
                           resume=not no_resume, force=force, quiet=quiet, hash=hash_algo)
    report = merge_checkpoint(src, out, options)
    if not quiet:
        click.echo(
            f"merged TP={report.tp_degree} ({report.layout}) -> {report.out_dir}: "
            f"{report.total_bytes / 1e9:.3f} GB, {report.files_written} file(s) written, "
            f"{report.files_reused} reused; max replica divergence {report.max_replica_divergence:.3g}"
        )


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="NeoX YAML (or config.json) of the model; default: configs/*.yml next to SRC.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_run
def inspect(src: Path, config_path: Path | None, as_json: bool) -> None:
    """Describe the checkpoint SRC without reading its tensor data."""
    from neoxconv.inspect import inspect_checkpoint

    info = inspect_checkpoint(src, config_path=config_path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key in ("files_found",):
            click.echo(f"{key:>18}: {len(value)} file(s)")
        else:
            click.echo(f"{key:>18}: {value}")


def _parse_ids(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter("expected comma-separated token ids, e.g. 12092,1533") from None


@main.command()
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--prompt", help="Text to continue (needs OUT/tokenizer.json or --tokenizer).")
@click.option("--ids", "ids_text", help="The prompt as comma-separated token ids instead of text.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Tokens to generate (stops at EOS).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto = cuda when available.")
@click.option("--dtype", type=_dtype_choice, default="auto", show_default=True, help="auto = fp16 on cuda, fp32 on cpu.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              help="tokenizer.json (default: OUT/tokenizer.json).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k most likely tokens (0 = all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--against", type=click.Path(path_type=Path),
              help="The unmerged checkpoint: compare with a simulated tensor-parallel forward over its rank shards.")
@click.option("--against-config", type=click.Path(path_type=Path, dir_okay=False),
              help="Config for --against when it is not next to that checkpoint.")
@click.option("--row-bias", type=click.Choice(["auto", "sum", "replicated"]), default="auto", show_default=True,
              help="How the --against simulation applies row-parallel biases (auto follows the config).")
@click.option("--reference", type=click.Choice(["hf"]), help="Also compare with transformers' GPTNeoXForCausalLM.")
@click.option("--int8", is_flag=True, help="Also run LLM.int8 (bitsandbytes) and compare it with full precision.")
@click.option("--int8-threshold", type=float, default=6.0, show_default=True, help="LLM.int8 outlier threshold.")
@click.option("--check-hashes/--no-check-hashes", default=None,
              help="Check every file's hash (BLAKE3 or sha256, as the manifest records) against the manifest "
                   "(default: on for models under 2 GB).")
@click.option("--attention", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
              help="eager: fp32 scores (the reference); sdpa: torch's fused attention kernel.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_run
def verify(out: Path, prompt: str | None, ids_text: str | None, max_new_tokens: int, device: str, dtype: str,
           tokenizer_path: Path | None, temperature: float, top_k: int, top_p: float, seed: int,
           against: Path | None, against_config: Path | None, row_bias: str, reference: str | None, int8: bool,
           int8_threshold: float, check_hashes: bool | None, attention: str, as_json: bool, quiet: bool) -> None:
    """Load the merged folder OUT into neoxconv's own layers, generate, and check the conversion.

    \b
    Checks (exit code 7 when one fails its tolerance):
      integrity     files present, sizes and hashes as in the manifest, headers agree with config.json
      kv_cache      cached step-by-step logits vs one uncached forward over the same tokens
      sanity        logits finite and not constant
      against       with --against SRC: vs a simulated tensor-parallel forward over the unmerged shards
      reference_hf  with --reference hf: vs transformers' GPTNeoXForCausalLM
      int8_*        with --int8: LLM.int8 top-1 agreement and weight memory
    """
    from neoxconv.generation import Sampling
    from neoxconv.verify import VerifyOptions, format_report, report_json, verify_model

    try:
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    options = VerifyOptions(
        prompt=prompt, ids=_parse_ids(ids_text), max_new_tokens=max_new_tokens, device=device, dtype=dtype,
        tokenizer=tokenizer_path, sampling=sampling, against=against, against_config=against_config,
        row_bias=row_bias, reference=reference, int8=int8, int8_threshold=int8_threshold,
        check_hashes=check_hashes, attention=attention, quiet=quiet or as_json,
    )
    report = verify_model(out, options)
    click.echo(report_json(report) if as_json else format_report(report))
    if not report.ok:
        sys.exit(VerificationError.exit_code)


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the demo files here (default: a temporary folder, removed afterwards).")
@click.option("--tp", "tp_degree", type=int, default=2, show_default=True, help="Tensor-parallel degree of the demo.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              help="A tokenizer.json for the demo (default: the 20B tokenizer if found, else token ids).")
@_run
def demo(workdir: Path | None, tp_degree: int, tokenizer_path: Path | None) -> None:
    """Build a tiny synthetic GPT-NeoX-20B-layout checkpoint, merge it, inspect it, verify it."""
    from neoxconv.demo import run_demo

    run_demo(workdir=workdir, tp_degree=tp_degree, tokenizer=tokenizer_path, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
