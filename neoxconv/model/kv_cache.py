"""A preallocated key/value cache, passed explicitly into the model's forward.

One `LayerKVCache` per transformer layer holds k and v buffers of shape (B, kvh, max_len, hd), kvh the kv
heads (= the heads without grouped-query attention). Decoding a
token writes one position and attends over a view of the first ``start + 1`` positions: no reallocation,
no concatenation, cost O(current length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neoxconv.config import NeoXConfig


@dataclass
class LayerKVCache:
    k: torch.Tensor  # (B, nh, max_len, hd)
    v: torch.Tensor  # (B, nh, max_len, hd)

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) at positions start..start+T-1; return views of positions 0..start+T-1."""
        end = start + k.shape[-2]
        if end > self.k.shape[-2]:
            raise ValueError(f"KV cache holds {self.k.shape[-2]} positions; writing up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Caches for every layer of one model, for ``batch`` sequences of up to ``max_len`` tokens.

    ``layer_devices`` puts each layer's cache on that layer's device (a model spread over GPUs); default
    ``device`` for all.
    """

    def __init__(self, config: NeoXConfig, *, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype, layer_devices: list[torch.device] | None = None) -> None:
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        devices = layer_devices or [device] * config.num_layers
        self.layers = [LayerKVCache(torch.zeros(shape, device=d, dtype=dtype),
                                    torch.zeros(shape, device=d, dtype=dtype))
                       for d in devices]
        self.max_len = max_len
        self.length = 0  # positions filled so far

    @property
    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self.layers)
