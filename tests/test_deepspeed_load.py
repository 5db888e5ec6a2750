"""DeepSpeed's own loading code reads what `neoxconv split` writes (CPU, no distributed launch).

What runs is DeepSpeed's: `PipelineModule.load_state_dir` (the pipeline layout: it globs each layer's
``layer_XX-*model_states.pt`` files, picks this rank's with its `MegatronSDLoader`, and calls
``layer.load_state_dict(strict=True)``), the same loader on the ``mp_rank_XX_model_states.pt`` files (which
checks ``mp_world_size`` against the file count, as `DeepSpeedEngine._load_checkpoint` does), and
`DeepSpeedEngine.load_module_state_dict` (the sequential layout's ``module``, strict). What is not run: the
engine's constructor, which needs a distributed process group and an optimizer; the module objects are
stand-ins with gpt-neox's parameter names and per-rank shapes (gpt-neox itself is not installable here).
"""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed")

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.pipe.module import PipelineModule  # noqa: E402
from deepspeed.runtime.state_dict_factory import SDLoaderFactory  # noqa: E402

from neoxconv.output.split import SplitOptions, split_model  # noqa: E402

from conftest import hf_tensors, make_hf_folder  # noqa: E402

H, HEADS, F, V, L = 64, 8, 256, 512, 2


class _Rotary(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.zeros(dims // 2), persistent=True)  # rotary_save_freqs_buffer


class _Attention(nn.Module):
    def __init__(self, tp: int) -> None:
        super().__init__()
        self.query_key_value = nn.Linear(H, 3 * H // tp)  # ColumnParallelLinear
        self.rotary_emb = _Rotary(2)
        self.dense = nn.Linear(H // tp, H)  # RowParallelLinear


class _MLP(nn.Module):
    def __init__(self, tp: int) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(H, F // tp)
        self.dense_4h_to_h = nn.Linear(F // tp, H)


class _Block(nn.Module):  # gpt-neox ParallelTransformerLayerPipe's parameter names
    def __init__(self, tp: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(H)
        self.attention = _Attention(tp)
        self.post_attention_layernorm = nn.LayerNorm(H)
        self.mlp = _MLP(tp)


class _Embedding(nn.Module):
    def __init__(self, tp: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(V // tp, H)  # VocabParallelEmbedding


class _Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(H)


class _Readout(nn.Module):
    def __init__(self, tp: int) -> None:
        super().__init__()
        self.final_linear = nn.Linear(H, V // tp, bias=False)


def _stages(tp: int) -> list:
    """The GPT-NeoX pipe stages in order: index 1 and L+2 are parameter-free functions."""
    return [_Embedding(tp), lambda x: x, *[_Block(tp) for _ in range(L)], lambda x: x, _Norm(), _Readout(tp)]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf_folder(tmp_path_factory.mktemp("hf"), dtype=torch.float16, intermediate_size=F)


@pytest.mark.parametrize("tp", [2, 4])
def test_pipeline_module_load_state_dir_reads_every_rank(hf, tmp_path, tp):
    split_model(hf, tmp_path / "neox", SplitOptions(tp=tp, step=3, quiet=True, key_names="20b"))
    step = tmp_path / "neox" / (tmp_path / "neox" / "latest").read_text()
    engine = TorchCheckpointEngine()
    sd = hf_tensors(hf)
    for rank in range(tp):
        module = PipelineModule.__new__(PipelineModule)  # no process group: set what load_state_dir uses
        nn.Module.__init__(module)
        module.forward_funcs = _stages(tp)
        module._local_start = 0
        module._grid = SimpleNamespace(get_slice_parallel_rank=lambda r=rank: r,
                                       get_slice_parallel_world_size=lambda: tp)
        module.tied_comms = {}
        module.load_state_dir(str(step), checkpoint_engine=engine, strict=True)
        emb, block = module.forward_funcs[0], module.forward_funcs[2]
        rows = V // tp
        assert torch.equal(emb.word_embeddings.weight, sd["gpt_neox.embed_in.weight"][rank * rows:(rank + 1) * rows])
        cols = H // tp
        assert torch.equal(block.attention.dense.weight,
                           sd["gpt_neox.layers.0.attention.dense.weight"][:, rank * cols:(rank + 1) * cols])

        mp_files = sorted(str(p) for p in step.glob("mp_rank_*_model_states.pt"))
        _, book, _ = SDLoaderFactory.get_sd_loader(mp_files, checkpoint_engine=engine).load(
            tp, rank, is_pipe_parallel=True)
        assert book["module"] is None and book["global_steps"] == 3 and book["dp_world_size"] == 1


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_load_module_state_dict_reads_the_sequential_layout(hf, tmp_path, tp):
    split_model(hf, tmp_path / "neox", SplitOptions(tp=tp, layout="sequential", quiet=True, key_names="20b"))
    step = tmp_path / "neox" / "global_step0"
    mp_files = sorted(str(p) for p in step.glob("mp_rank_*_model_states.pt"))
    engine = TorchCheckpointEngine()
    sd = hf_tensors(hf)
    for rank in range(tp):
        _, checkpoint, _ = SDLoaderFactory.get_sd_loader(mp_files, checkpoint_engine=engine).load(tp, rank)
        stages = _stages(tp)
        model = nn.Module()
        model.sequential = nn.Sequential(OrderedDict(
            (str(i), s) for i, s in enumerate(stages) if isinstance(s, nn.Module)))
        fake_engine = SimpleNamespace(module=model)
        DeepSpeedEngine.load_module_state_dict(fake_engine, checkpoint=checkpoint, strict=True)
        readout = model.sequential[-1]
        rows = V // tp
        assert torch.equal(readout.final_linear.weight, sd["embed_out.weight"][rank * rows:(rank + 1) * rows])
        assert (checkpoint["mp_world_size"], checkpoint["skipped_steps"], checkpoint["iteration"]) == (tp, 0, 0)


def test_an_unexpected_key_would_fail_the_strict_load(hf, tmp_path):
    """The check above can fail: a stray key in one layer file makes DeepSpeed's strict load raise."""
    split_model(hf, tmp_path / "neox", SplitOptions(tp=1, quiet=True, key_names="20b"))
    step = tmp_path / "neox" / "global_step0"
    f = step / "layer_02-model_00-model_states.pt"
    shard = torch.load(f, weights_only=True)
    shard["attention.masked_bias"] = torch.zeros(1)
    torch.save(shard, f)
    module = PipelineModule.__new__(PipelineModule)
    nn.Module.__init__(module)
    module.forward_funcs, module._local_start, module.tied_comms = _stages(1), 0, {}
    module._grid = SimpleNamespace(get_slice_parallel_rank=lambda: 0, get_slice_parallel_world_size=lambda: 1)
    with pytest.raises(RuntimeError, match="masked_bias"):
        module.load_state_dir(str(step), checkpoint_engine=TorchCheckpointEngine(), strict=True)
