"""What OUT holds for the Hugging Face Hub: no private paths, a model card, a generation config.

Every file of OUT is uploaded as it is, so none may carry the machine's absolute paths (the source, OUT itself,
the temp folder, the user's home); the card is the user's to edit, and verify does not count that as tampering.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from conftest import COMMITTED_FIXTURE, cli


def _private_strings(*paths: Path) -> list[str]:
    """The absolute places that must not appear in OUT (resolved and as given)."""
    found = {str(Path.home()), str(Path(tempfile.gettempdir()).resolve()), tempfile.gettempdir()}
    for p in paths:
        found |= {str(p), str(Path(p).resolve())}
    return sorted(s for s in found if len(s) > 1)


def _leaks(out: Path, private: list[str]) -> list[str]:
    hits = []
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p.relative_to(out)}: {s}" for s in private if s.encode() in data]
    return hits


def test_no_absolute_path_in_any_output(tmp_path):
    """merge, split and reshard: no file of OUT names the source, OUT, the temp folder or the home folder."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    merged, split, resharded = tmp_path / "merged", tmp_path / "split", tmp_path / "resharded"
    for args in (("merge", "-q", src, merged), ("split", "-q", merged, split, "--tp", "1"),
                 ("reshard", "-q", src, resharded, "--tp", "1")):
        result = cli(*args)
        assert result.exit_code == 0, result.output
    private = _private_strings(src, merged, split, resharded, tmp_path)
    for out in (merged, split, resharded):
        assert (out / "neoxconv.json").is_file()
        assert _leaks(out, private) == []
    manifest = json.loads((merged / "neoxconv.json").read_text())
    assert manifest["source"]["step_dir"] == "global_step150000"  # the step folder's name only
    assert json.loads((split / "neoxconv.json").read_text())["source"]["hf_dir"] == "merged"


def test_source_inside_out_is_recorded_relative(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(COMMITTED_FIXTURE, out / "ckpt")  # OUT/ckpt: the source inside OUT (a "foreign" file)
    result = cli("merge", "-q", "--force", out / "ckpt", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "neoxconv.json").read_text())["source"]["step_dir"] == "ckpt/global_step150000"


def test_old_manifest_with_absolute_source_still_resumes(tmp_path):
    """A manifest written before this fix records the absolute step folder: the same merge resumes from it
    (every layer kept, fingerprints proven), and the new manifest no longer holds the path."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    out = tmp_path / "out"
    assert cli("merge", "-q", src, out).exit_code == 0
    manifest = json.loads((out / "neoxconv.json").read_text())
    manifest["source"]["step_dir"] = str((src / "global_step150000").resolve())  # as the previous version wrote it
    (out / "neoxconv.json").write_text(json.dumps(manifest, indent=2))
    result = cli("merge", "--json", src, out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["files_written"] == 0 and report["files_reused"] == 5
    assert _leaks(out, _private_strings(src, out)) == []
    assert cli("verify", "-q", out, "--ids", "1,2,3", "--max-new-tokens", "1").exit_code == 0


# ----- the model card and the generation config --------------------------------------------------------------
def _merge_json(*args) -> dict:
    result = cli("merge", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_model_card_front_matter_and_provenance(tmp_path):
    """huggingface_hub reads the card's front matter; the body says where the weights came from, without paths."""
    from huggingface_hub import ModelCard

    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    out = tmp_path / "out"
    _merge_json(src, out, "--license", "apache-2.0", "--dtype", "fp32")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert {"gpt-neox", "neoxconv"} <= set(card.data.tags)
    for fact in ("global_step150000", "pipeline layout", "| tensor-parallel degree | 2 |",
                 "dense_h_to_4h/dense_4h_to_h", "float32", "neoxconv 0.1.0", "replica-tolerance", "CRC-32",
                 "`neoxconv merge src OUT --dtype fp32 --license apache-2.0`"):
        assert fact in card.text, fact
    assert _leaks(out, _private_strings(src, out, tmp_path)) == []
    # the default license is the Hub's "other", for the user to set
    out2 = tmp_path / "out2"
    _merge_json(src, out2)
    assert ModelCard.load(out2 / "README.md").data.license == "other"


def test_generation_config_holds_the_token_ids(merged_fixture):
    from transformers import GenerationConfig

    config = json.loads((merged_fixture / "config.json").read_text())
    gen = GenerationConfig.from_pretrained(merged_fixture)
    assert (gen.bos_token_id, gen.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    assert gen.pad_token_id is None  # the config has none: transformers is not told one


def test_generation_config_takes_pad_from_the_config():
    from neoxconv.output.hub import generation_config

    assert generation_config({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "vocab_size": 9}) == \
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    assert generation_config({"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None}) == \
        {"bos_token_id": 0, "eos_token_id": 0}


def test_edited_card_is_kept_and_is_not_tampering(tmp_path, caplog):
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    out = tmp_path / "out"
    _merge_json(src, out)
    card = out / "README.md"
    edited = card.read_text().replace("license: other", "license: mit") + "\nIntended use: tests.\n"
    card.write_text(edited)
    report = _merge_json(src, out)  # the same merge again: a no-op that keeps the user's card
    assert report["files_written"] == 0 and card.read_text() == edited
    verified = cli("verify", out, "--ids", "1,2,3", "--max-new-tokens", "1")
    assert verified.exit_code == 0, verified.output
    # another --license changes what neoxconv would write: the edited card is still kept, with a warning
    result = cli("merge", src, out, "--license", "cc-by-4.0")
    assert result.exit_code == 0 and card.read_text() == edited
    assert "README.md: kept as it is" in caplog.text
    # everything else is still covered: an edited generation config is a modified file
    (out / "generation_config.json").write_text('{"bos_token_id": 5, "eos_token_id": 5}\n')
    tampered = cli("verify", out, "--ids", "1,2,3", "--max-new-tokens", "1")
    assert tampered.exit_code != 0 and "generation_config.json" in tampered.output


def test_unedited_card_follows_the_merge(tmp_path):
    """A card still as neoxconv wrote it is rewritten when the merge changes; a deleted one is written again."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    out = tmp_path / "out"
    _merge_json(src, out)
    _merge_json(src, out, "--license", "mit")
    assert "license: mit" in (out / "README.md").read_text()
    (out / "README.md").unlink()
    _merge_json(src, out)
    assert "license: other" in (out / "README.md").read_text()


def test_foreign_readme_is_never_replaced(tmp_path):
    """--force into a folder holding someone's README.md: the card is not written over it."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my own notes\n")
    result = cli("merge", "-q", "--force", src, out)
    assert result.exit_code == 0, result.output
    assert (out / "README.md").read_text() == "my own notes\n"


def test_bad_license_is_a_usage_error(tmp_path):
    from conftest import one_line_error

    result = cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "--license", "MIT\nlicense: x")
    one_line_error(result, 2, "--license")
    assert not (tmp_path / "out").exists()
