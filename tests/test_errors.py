"""Broken checkpoints give one clear error naming the file and key, and leave nothing half-written."""

import shutil

import pytest
import torch
from click.testing import CliRunner

from neoxconv.cli import main
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.errors import CheckpointError, ConfigError, MergeError

from conftest import COMMITTED_FIXTURE

STEP = "global_step150000"


@pytest.fixture()
def ckpt(tmp_path):
    root = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, root)
    return root


def _rewrite(path, change):
    d = torch.load(path, weights_only=True)
    change(d)
    torch.save(d, path)


def _assert_clean(out):
    """No temp files, no index or manifest after a failure."""
    if out.exists():
        names = {p.name for p in out.iterdir()}
        assert not any(n.endswith(".neoxconv-tmp") for n in names), names
        assert "model.safetensors.index.json" not in names and "neoxconv.json" not in names


def _merge_fails(root, out, error, *words, **opts):
    with pytest.raises(error) as e:
        merge_checkpoint(root, out, MergeOptions(quiet=True, **opts))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    _assert_clean(out)
    return str(e.value)


def test_missing_rank_file(ckpt, tmp_path):
    (ckpt / STEP / "layer_03-model_01-model_states.pt").unlink()
    _merge_fails(ckpt, tmp_path / "out", CheckpointError, "layer_03-model_01-model_states.pt", "missing")
    assert not (tmp_path / "out").exists()  # preflight: nothing was created


def test_rank_count_differs_between_layers(ckpt, tmp_path):
    shutil.copy(ckpt / STEP / "layer_02-model_01-model_states.pt", ckpt / STEP / "layer_02-model_02-model_states.pt")
    _merge_fails(ckpt, tmp_path / "out", CheckpointError, "layer 00", "missing layer_00-model_02-model_states.pt")


def test_shape_mismatch_between_ranks_names_key_and_ranks(ckpt, tmp_path):
    _rewrite(ckpt / STEP / "layer_03-model_01-model_states.pt",
             lambda d: d.__setitem__("mlp.dense_h_to_4h.weight", d["mlp.dense_h_to_4h.weight"][:-1]))
    _merge_fails(ckpt, tmp_path / "out", MergeError, "layer 03", "mlp.dense_h_to_4h.weight", "rank 1: [63, 32]")


def test_shape_against_config(ckpt, tmp_path):
    for r in range(2):
        _rewrite(ckpt / STEP / f"layer_02-model_{r:02d}-model_states.pt",
                 lambda d: d.__setitem__("input_layernorm.weight", torch.ones(31, dtype=torch.float16)))
    _merge_fails(ckpt, tmp_path / "out", MergeError, "input_layernorm.weight", "config expects [32]")


def test_unknown_key_names_file_and_key(ckpt, tmp_path):
    _rewrite(ckpt / STEP / "layer_02-model_00-model_states.pt", lambda d: d.__setitem__("attention.new_thing", torch.ones(1)))
    _merge_fails(ckpt, tmp_path / "out", CheckpointError, "layer_02-model_00-model_states.pt", "attention.new_thing")


def test_known_derived_buffers_are_dropped(ckpt, tmp_path):
    for r in range(2):
        _rewrite(ckpt / STEP / f"layer_02-model_{r:02d}-model_states.pt",
                 lambda d: d.update({"attention.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool),
                                     "attention.masked_bias": torch.tensor(-1e4)}))
    merge_checkpoint(ckpt, tmp_path / "out", MergeOptions(quiet=True))


def test_replica_divergence_fails_beyond_tolerance(ckpt, tmp_path):
    _rewrite(ckpt / STEP / "layer_05-model_01-model_states.pt", lambda d: d["norm.weight"].add_(0.5))
    msg = _merge_fails(ckpt, tmp_path / "out", MergeError, "norm.weight", "0.5", "--replica-tolerance")
    assert "layer 05" in msg
    report = merge_checkpoint(ckpt, tmp_path / "out", MergeOptions(quiet=True, replica_tolerance=1.0))
    assert report.max_replica_divergence == pytest.approx(0.5, abs=1e-3)


def test_nonfinite_weights_fail_unless_allowed(ckpt, tmp_path):
    def poison(d):
        d["attention.query_key_value.weight"][3, 4] = float("nan")
    _rewrite(ckpt / STEP / "layer_03-model_00-model_states.pt", poison)
    _merge_fails(ckpt, tmp_path / "out", MergeError, "attention.query_key_value.weight", "non-finite", "--allow-nonfinite")
    report = merge_checkpoint(ckpt, tmp_path / "out", MergeOptions(quiet=True, allow_nonfinite=True))
    assert any("non-finite" in w for w in report.warnings)


def test_missing_config_asks_for_one(ckpt, tmp_path):
    shutil.rmtree(ckpt / "configs")
    _merge_fails(ckpt, tmp_path / "out", ConfigError, "--config")


def test_hostile_layer_file_is_refused_through_the_cli(ckpt, tmp_path):
    import os

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"word_embeddings.weight": torch.zeros(256, 32, dtype=torch.float16), "x": Payload()},
               ckpt / STEP / "layer_00-model_01-model_states.pt")
    result = CliRunner().invoke(main, ["merge", str(ckpt), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 4
    assert "layer_00-model_01-model_states.pt" in result.output and "refused" in result.output
    assert "Traceback" not in result.output and not marker.exists()
