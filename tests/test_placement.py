"""verify at any size: --max-memory / --device-map give the same ids, checks and logits as a resident model."""

import json

import pytest
import torch
from click.testing import CliRunner

from neoxconv.cli import main
from neoxconv.model.generation import generate
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.runtime import placement
from neoxconv.runtime.loading import load_model
from neoxconv.runtime.placement import PlacementError, parse_max_memory, parse_size, plan_placement
from neoxconv.verify import VerifyOptions, verify_model

PROMPT = (12092, 1533, 13, 50, 7000)
LAYER = 12 * 64 * 64 * 4 + 13 * 64 * 4  # one fp32 block of tiny_config (hidden 64): ~200 KB
ONE_LAYER_CAP = LAYER + (LAYER // 2)  # one block resident, the other streamed; embedding/readout (~13 MB) over it


@pytest.fixture(scope="module")
def resident(merged_fp32):
    _, out = merged_fp32
    return verify_model(out, VerifyOptions(ids=PROMPT, max_new_tokens=8, device="cpu"))


def test_size_parser():
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("20GB") == 20 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("4096") == 4096 and parse_size("2 kb") == 2000
    assert parse_max_memory("0=20GB,1=20GB,cpu=30GB") == {0: 20 * 10**9, 1: 20 * 10**9, "cpu": 30 * 10**9}
    assert parse_max_memory("cuda:1=1GiB") == {1: 2**30}
    for bad in ("lots", "12XB", "0", "-1GB", "gpu=1GB", "0=1GB,0=2GB", "cpu=", "=1GB", ",", "1GB,cpu=1GB"):
        with pytest.raises(ValueError):
            parse_max_memory(bad)


@pytest.mark.parametrize("value, message", [
    ("lots", "is not a size"), ("gpu=1GB", "is not a device"), ("0=1GB,0=2GB", "given twice"),
    ("0=1GB", "names device 0"),  # no GPU for --device cpu: a usage error too
])
def test_bad_max_memory_is_a_usage_error(merged_fp32, value, message):
    _, out = merged_fp32
    result = CliRunner().invoke(main, ["verify", str(out), "--ids", "1,2", "--device", "cpu", "--max-memory", value])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_capped_generation_equals_resident_and_streams(merged_fp32, resident):
    _, out = merged_fp32
    capped = verify_model(out, VerifyOptions(ids=PROMPT, max_new_tokens=8, device="cpu", max_memory=ONE_LAYER_CAP))
    assert capped.ok, [c for c in capped.checks if not c.passed]
    assert capped.generated_ids == resident.generated_ids
    assert capped.device_map["gpt_neox.layers.0"] == "cpu" and capped.device_map["gpt_neox.layers.1"] == "disk"
    assert capped.device_map["gpt_neox.embed_in"] == "disk" and capped.device_map["embed_out"] == "disk"
    assert capped.weight_bytes <= ONE_LAYER_CAP < resident.weight_bytes
    assert capped.offloaded_bytes == resident.weight_bytes - capped.weight_bytes
    assert capped.kv_cache_max_abs_diff == pytest.approx(resident.kv_cache_max_abs_diff, abs=1e-5)
    assert any("embed_in" in n and "larger than the memory cap" in n for n in capped.notes)
    assert capped.peak_memory_kind in ("rss_anon", "ru_maxrss") and capped.peak_memory_bytes > 0


def test_capped_logits_equal_resident_logits(merged_fp32):
    _, out = merged_fp32
    full = load_model(out, device="cpu", dtype="fp32")
    ref = generate(full.model, list(PROMPT), max_new_tokens=6)
    for cap in (ONE_LAYER_CAP, 1):  # 1 byte: every stage on disk, the final norm too
        placed = load_model(out, device="cpu", dtype="fp32", max_memory=cap)
        assert placed.placement is not None and placed.weight_bytes <= cap
        got = generate(placed.model, list(PROMPT), max_new_tokens=6, devices=placed.devices)
        assert got.generated_ids == ref.generated_ids
        torch.testing.assert_close(got.prompt_logits, ref.prompt_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.step_logits, ref.step_logits, rtol=0, atol=1e-5)
    assert set(placed.placement.device_map.values()) == {"disk", "cpu"}  # only the rotary tables stay


def test_all_checks_and_against_with_a_cap(merged_fp32, resident):
    root, out = merged_fp32
    base = verify_model(out, VerifyOptions(ids=PROMPT, max_new_tokens=8, device="cpu", against=root))
    capped = verify_model(out, VerifyOptions(ids=PROMPT, max_new_tokens=8, device="cpu", against=root,
                                             max_memory=ONE_LAYER_CAP))
    assert capped.ok and base.ok
    assert capped.generated_ids == base.generated_ids
    for a, b in zip(capped.checks, base.checks):
        assert a.name == b.name and a.passed == b.passed
        if a.value is not None:
            assert a.value == pytest.approx(b.value, abs=1e-5), a.name


def test_reference_hf_with_a_cap(merged_fp32):
    pytest.importorskip("transformers")
    _, out = merged_fp32
    report = verify_model(out, VerifyOptions(ids=PROMPT, max_new_tokens=4, device="cpu", reference="hf",
                                             max_memory=ONE_LAYER_CAP))
    assert report.ok, [c for c in report.checks if not c.passed]


def test_int8_with_a_cap_equals_int8_resident(merged_fp32):
    pytest.importorskip("bitsandbytes")
    _, out = merged_fp32
    full = verify_model(out, VerifyOptions(ids=PROMPT, max_new_tokens=8, device="cpu", int8=True))
    capped = verify_model(out, VerifyOptions(ids=PROMPT, max_new_tokens=8, device="cpu", int8=True,
                                             max_memory=ONE_LAYER_CAP))
    assert full.ok and capped.ok, [c for c in capped.checks if not c.passed]
    assert capped.int8["top1_agreement"] == full.int8["top1_agreement"]
    assert capped.int8["prompt_max_abs_logit_diff"] == pytest.approx(full.int8["prompt_max_abs_logit_diff"], abs=1e-5)
    assert capped.int8["memory_ratio"] == pytest.approx(full.int8["memory_ratio"], rel=0.05)


@pytest.mark.parametrize("device_map", ["auto", "balanced", "sequential"])
def test_device_maps_on_cpu(merged_fp32, resident, device_map):
    _, out = merged_fp32
    uncapped = verify_model(out, VerifyOptions(ids=PROMPT, max_new_tokens=8, device="cpu", device_map=device_map))
    assert set(uncapped.device_map.values()) == {"cpu"} and uncapped.offloaded_bytes == 0
    capped = verify_model(out, VerifyOptions(ids=PROMPT, max_new_tokens=8, device="cpu", device_map=device_map,
                                             max_memory={"cpu": ONE_LAYER_CAP}))
    assert "disk" in capped.device_map.values()
    assert uncapped.generated_ids == capped.generated_ids == resident.generated_ids
    assert uncapped.ok and capped.ok


def test_cli_json_reports_offload_and_the_map(merged_fp32, resident):
    _, out = merged_fp32
    result = CliRunner().invoke(main, ["verify", str(out), "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 8,
                                       "--device", "cpu", "--device-map", "sequential", "--max-memory",
                                       f"cpu={ONE_LAYER_CAP}", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["generated_ids"] == resident.generated_ids
    assert report["offloaded_bytes"] > 0 and report["device_map"]["gpt_neox.layers.1"] == "disk"
    assert report["dtype"] == "float32"  # the dtype default does not change with a map


def test_verify_picks_a_cap_when_the_model_does_not_fit(merged_fp32, resident, monkeypatch):
    _, out = merged_fp32
    monkeypatch.setattr(placement, "available_memory", lambda device: ONE_LAYER_CAP + (1 << 20))
    monkeypatch.setattr(placement, "runtime_reserve", lambda *a, **k: 1 << 20)
    import neoxconv.verify as verify_mod

    monkeypatch.setattr(verify_mod, "runtime_reserve", lambda *a, **k: 1 << 20)
    report = verify_model(out, VerifyOptions(ids=PROMPT, max_new_tokens=8, device="cpu"))
    assert report.ok and report.generated_ids == resident.generated_ids
    assert report.offloaded_bytes > 0
    assert any("choose with --max-memory" in n for n in report.notes)


def test_stock_accelerate_maps_everything_to_disk_below_the_largest_module(merged_fp32):
    """Why the device map is neoxconv's own: accelerate reserves the largest module on every device."""
    accelerate = pytest.importorskip("accelerate")
    from neoxconv.config import load_out_config
    from neoxconv.layers import NeoXForCausalLM

    _, out = merged_fp32
    with torch.device("meta"):
        model = NeoXForCausalLM(load_out_config(out))
    stock = accelerate.infer_auto_device_map(model, max_memory={"cpu": ONE_LAYER_CAP},
                                             no_split_module_classes=["TransformerLayer"])
    assert set(stock.values()) == {"disk"}
    ours = plan_placement(model, dtype=torch.float32, main_device=torch.device("cpu"), max_memory=ONE_LAYER_CAP)
    assert ours.device_map["gpt_neox.layers.0"] == "cpu"


def test_unknown_gpu_in_a_device_map_on_cpu_is_a_placement_error(merged_fp32):
    _, out = merged_fp32
    with pytest.raises(PlacementError, match="names device 1"):
        verify_model(out, VerifyOptions(ids=PROMPT, device="cpu", device_map="auto", max_memory={1: 10**9}))


def test_against_reads_the_readout_in_blocks_with_the_same_logits(merged_fp32, monkeypatch):
    from neoxconv.check import tp_reference

    root, _ = merged_fp32
    whole, _ = tp_reference.tensor_parallel_logits(root, list(PROMPT))
    monkeypatch.setattr(tp_reference, "READ_BLOCK_BYTES", 1000 * 64 * 4)  # 1000 rows of the readout at a time
    blocks, _ = tp_reference.tensor_parallel_logits(root, list(PROMPT))
    torch.testing.assert_close(blocks, whole, rtol=0, atol=1e-5)


def test_offloaded_embedding_and_readout_stream_rows(merged_fp32, monkeypatch):
    """Embedding: only the looked-up rows are read; readout: a block of rows at a time; same logits."""
    _, out = merged_fp32
    ref = generate(load_model(out, device="cpu", dtype="fp32").model, list(PROMPT), max_new_tokens=4)
    monkeypatch.setattr(placement, "ROW_BLOCK_BYTES", 1000 * 64 * 4)  # 1000 rows of 50432: 51 blocks
    placed = load_model(out, device="cpu", dtype="fp32", max_memory=ONE_LAYER_CAP)
    assert isinstance(placed.model.gpt_neox.embed_in, placement.RowStreamedEmbedding)
    assert isinstance(placed.model.embed_out, placement.RowStreamedLinear)
    got = generate(placed.model, list(PROMPT), max_new_tokens=4, devices=placed.devices)
    assert got.generated_ids == ref.generated_ids
    torch.testing.assert_close(got.prompt_logits, ref.prompt_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides",
                         [{"tie_word_embeddings": True}, {"parallel_residual": False, "activation": "gelu"}])
def test_other_architectures_with_everything_on_disk(make_checkpoint, tmp_path, overrides):
    root, _, _ = make_checkpoint(2, "pipeline", "float32", config_overrides=overrides)
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    full = verify_model(tmp_path / "out", VerifyOptions(ids=PROMPT, max_new_tokens=6, device="cpu"))
    capped = verify_model(tmp_path / "out", VerifyOptions(ids=PROMPT, max_new_tokens=6, device="cpu", max_memory=1,
                                                          against=root))
    assert capped.ok, [c for c in capped.checks if not c.passed]
    assert capped.generated_ids == full.generated_ids and capped.weight_bytes == 0


def test_kv_cache_of_each_layer_on_that_layers_device():
    from neoxconv.model.kv_cache import KVCache
    from neoxconv.tools.synthetic import tiny_config

    cfg = tiny_config(num_layers=3)
    devices = [torch.device("cpu"), torch.device("meta"), torch.device("cpu")]
    cache = KVCache(cfg, batch=1, max_len=8, device="cpu", dtype=torch.float16, layer_devices=devices)
    assert [c.k.device for c in cache.layers] == devices and [c.v.device for c in cache.layers] == devices


@pytest.mark.parametrize("kind", ["sequential", "balanced"])
def test_gpu_device_maps_are_planned_without_a_gpu(monkeypatch, kind):
    """Planning alone (no dispatch) for two 10 MB GPUs: sequential fills GPU 0; balanced spreads the layers."""
    from neoxconv.layers import NeoXForCausalLM
    from neoxconv.tools.synthetic import tiny_config

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(placement, "available_memory", lambda device: 10**7 if device != "cpu" else 10**9)
    with torch.device("meta"):
        model = NeoXForCausalLM(tiny_config(num_layers=8, vocab_size=1024))
    plan = plan_placement(model, dtype=torch.float16, main_device=torch.device("cuda", 0), device_map=kind)
    layers = [plan.device_map[f"gpt_neox.layers.{i}"] for i in range(8)]
    if kind == "sequential":
        assert set(plan.device_map.values()) == {0}
    else:
        assert layers[0] == 0 and layers[-1] == 1 and layers == sorted(layers)
    assert plan.devices.layers == tuple(torch.device("cuda", d) for d in layers)  # where each KV cache goes
    assert plan.devices.inputs == torch.device("cuda", 0)
    assert plan.offloaded_bytes == 0 and plan.main_device == torch.device("cuda", 0)


def test_a_gpu_cap_sends_the_rest_to_cpu_ram_in_a_map(monkeypatch):
    from neoxconv.layers import NeoXForCausalLM
    from neoxconv.tools.synthetic import tiny_config

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(placement, "available_memory", lambda device: 10**9)
    with torch.device("meta"):
        model = NeoXForCausalLM(tiny_config(num_layers=4, vocab_size=1024))
    sizes = placement.unit_sizes(model, torch.float16)
    cap = sizes["gpt_neox.embed_in"] + 2 * sizes["gpt_neox.layers.0"]
    plan = plan_placement(model, dtype=torch.float16, main_device=torch.device("cuda", 0), device_map="auto",
                          max_memory=parse_max_memory(f"0={cap},cpu=1GB"))
    assert [plan.device_map[f"gpt_neox.layers.{i}"] for i in range(4)] == [0, 0, "cpu", "cpu"]
    assert plan.device_map["embed_out"] == "cpu"
    # CPU RAM stages are offloaded on a GPU run: moved to the GPU for each use
    assert plan.offloaded_bytes == sum(sizes[u] for u, d in plan.device_map.items() if d == "cpu") > 0
    assert plan.execution_device("gpt_neox.layers.3") == torch.device("cuda", 0)


# ----- one loader for resident and placed models ---------------------------------------------------------
def test_the_loader_says_where_the_model_runs_and_hangs_nothing_on_it(merged_fp32):
    """Resident and placed models come from the same loader; the devices are a typed object handed to
    generate, not an attribute read back off the model."""
    from neoxconv.model.generation import ExecutionDevices

    _, out = merged_fp32
    full = load_model(out, device="cpu", dtype="fp32")
    n = len(full.model.blocks)
    assert full.placement is None and full.devices == ExecutionDevices(torch.device("cpu"), (torch.device("cpu"),) * n)
    placed = load_model(out, device="cpu", dtype="fp32", max_memory=1)
    assert placed.devices == placed.placement.devices and len(placed.devices.layers) == n
    for loaded in (full, placed):
        assert not [k for k in vars(loaded.model) if "placement" in k or "neoxconv" in k]
    # every weight offloaded: nothing on the model says where to run, so generate asks for the devices
    with pytest.raises(ValueError, match="LoadedModel.devices"):
        generate(placed.model, list(PROMPT), max_new_tokens=1)


@pytest.mark.parametrize("max_memory", [None, ONE_LAYER_CAP])
@pytest.mark.parametrize("damage, message", [
    ("extra", "unexpected tensors gpt_neox.layers.9.mlp.bogus.weight"),
    ("missing", "no weights for gpt_neox.layers.1.attention.dense.weight"),
    ("moved", "no tensor gpt_neox.layers.1.attention.dense.weight, which model.safetensors.index.json places"),
    ("no file", "model-99999-of-99999.safetensors: cannot read it as safetensors"),
])
def test_a_resident_and_a_placed_load_refuse_the_same_bad_index(merged_fp32, tmp_path, max_memory, damage, message):
    import shutil

    from neoxconv.errors import VerificationError

    _, out = merged_fp32
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    name = "gpt_neox.layers.1.attention.dense.weight"
    if damage == "extra":
        index["weight_map"]["gpt_neox.layers.9.mlp.bogus.weight"] = index["weight_map"][name]
    elif damage == "missing":
        del index["weight_map"][name]
    elif damage == "moved":  # the index places it in a file that does not hold it
        index["weight_map"][name] = index["weight_map"]["gpt_neox.layers.0.attention.dense.weight"]
    else:
        index["weight_map"][name] = "model-99999-of-99999.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(VerificationError, match=message.replace(".", r"\.")):
        load_model(copy, device="cpu", dtype="fp32", max_memory=max_memory)


def test_torch_dtypes_have_one_home_that_imports_torch_lazily():
    import subprocess
    import sys

    from neoxconv.dtypes import TORCH_FLOAT_DTYPES, as_torch_dtype

    assert [as_torch_dtype(n) for n in TORCH_FLOAT_DTYPES] == [torch.float16, torch.bfloat16, torch.float32]
    with pytest.raises(ValueError, match="int8"):
        as_torch_dtype("int8")
    code = "import sys, neoxconv.dtypes; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_memory_and_file_sizes_share_one_formatter():
    from neoxconv.progress import format_bytes

    assert format_bytes(116_500) == "116.5 kB" and format_bytes(41.12e9) == "41.12 GB"
    assert format_bytes(999) == "999 B"
    # memory too is decimal (issue 20): 1 GiB is 1.07 GB, never "1.00 GiB" beside a "GB" elsewhere
    assert format_bytes(1.5 * 2**30) == "1.61 GB" and format_bytes(1000) == "1.00 kB"
    assert format_bytes(300e6) == "300.0 MB"
