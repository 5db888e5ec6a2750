"""LLM.int8 as a separate swap step: replace each block's linear layers (the model class's ``LINEARS``: four
for GPT-NeoX, seven for Llama-style) by bitsandbytes' Linear8bitLt.

Embedding, norms and readout stay in the model's dtype (as in LLM.int8). bitsandbytes is imported lazily;
>= 0.45 runs Linear8bitLt on the CPU as well as on CUDA.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from neoxconv.errors import UsageError
from neoxconv.layers import weight_bytes


def require_bitsandbytes():
    """The bitsandbytes module; UsageError (exit 2) with the install hint when it cannot be imported."""
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError:
        raise UsageError(
            "--int8 needs bitsandbytes: pip install 'neoxconv[int8]' (or pip install bitsandbytes)"
        ) from None
    return bnb


def quantize_int8(model: nn.Module, *, threshold: float = 6.0) -> nn.Module:
    """Swap the linear layers of every transformer block for Linear8bitLt (in place); returns the model."""
    bnb = require_bitsandbytes()
    device = next(model.parameters()).device
    for block in model.blocks:
        for parent, name, lin in block_linears(model, block):
            setattr(parent, name, int8_linear(bnb, lin, threshold=threshold).to(device))  # moving quantizes
            del lin
    return model


def block_linears(model: nn.Module, block: nn.Module):
    """(parent module, attribute name, nn.Linear) for each linear layer of ``block`` that int8 swaps."""
    for path in model.LINEARS:
        parent_name, name = path.rsplit(".", 1)
        parent = block.get_submodule(parent_name)
        yield parent, name, getattr(parent, name)


def int8_linear(bnb, lin: nn.Linear, *, threshold: float, resident: bool = True) -> nn.Module:
    """A Linear8bitLt shaped like ``lin``; with ``resident`` it holds lin's weights (quantized when moved to a
    device), otherwise its parameters stay on the meta device for a hook to fill."""
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            has_fp16_weights=False, threshold=threshold, device="meta")
    if resident:
        q.weight = bnb.nn.Int8Params(lin.weight.data.to("cpu", torch.float16), requires_grad=False,
                                     has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q


def int8_weight_bytes(model: nn.Module) -> int:
    """Weight bytes including the per-row scales bitsandbytes keeps beside int8 weights."""
    extra = 0
    for m in model.modules():
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            extra += scb.numel() * scb.element_size()
    return weight_bytes(model) + extra
