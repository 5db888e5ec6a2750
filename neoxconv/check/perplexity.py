"""Perplexity of a text, streamed in windows: neoxconv's layers, the simulated tensor-parallel forward, transformers.

The window/stride rule (one rule for the three, so their figures compare token for token):

* the text's N tokens are read in windows of ``window`` tokens (at most ``max_position_embeddings``: positions
  restart at 0 in each window) starting every ``stride`` tokens (default ``window - 1``: consecutive windows
  share one token);
* token t (t >= 1) is scored once, in the first window that holds it *and* a token before it, from the context
  of that window only (positions ``start .. t-1``); the text's first token is never scored. With the default
  stride every other token is scored, each window's first token serving as the last one's context; a smaller
  stride gives each scored token more context (each window scores only the tokens not scored before);
* perplexity = exp(mean negative log-likelihood over the scored tokens), in nats, computed in fp32.

neoxconv's model runs each window through its KV cache ``chunk`` tokens at a time (the cache is reused inside a
window and started afresh for the next), so logits of at most ``chunk`` positions are in memory at once. The
simulated tensor-parallel forward and transformers run each window in one uncached forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neoxconv.config import NeoXConfig
from neoxconv.errors import UsageError
from neoxconv.model.generation import ExecutionDevices
from neoxconv.model.kv_cache import KVCache

CHUNK = 256  # positions per cached forward inside a window


@dataclass(frozen=True)
class Windows:
    """The window/stride rule (module docstring)."""

    window: int
    stride: int

    @classmethod
    def for_model(cls, config: NeoXConfig, *, window: int | None = None, stride: int | None = None) -> Windows:
        """``window`` defaults to (and may not exceed) max_position_embeddings; ``stride`` to window - 1."""
        most = config.max_position_embeddings
        window = most if window is None else window
        if not 2 <= window <= most:
            raise UsageError(f"--window {window}: a perplexity window holds 2 .. max_position_embeddings ({most}) "
                             "tokens")
        stride = window - 1 if stride is None else stride
        if not 1 <= stride <= window - 1:
            raise UsageError(f"--stride {stride}: must be 1 .. window - 1 ({window - 1}), or tokens would go unscored")
        return cls(window, stride)

    def spans(self, n: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, first scored) of each window over ``n`` tokens: it reads tokens start..end-1 and scores
        first..end-1 (each of those from the tokens before it in the window)."""
        scored_to = 1  # tokens 1.. still to score
        start = 0
        while scored_to < n:
            end = min(start + self.window, n)
            if end > scored_to:
                yield start, end, max(scored_to, start + 1)
                scored_to = end
            start += self.stride


@dataclass
class Perplexity:
    """Summed negative log-likelihood (nats) over ``tokens`` scored tokens."""

    nll: float = 0.0
    tokens: int = 0

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else float("nan")

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits (T, V) predicting ``targets`` (T,)."""
        self.nll += float(F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum"))
        self.tokens += int(targets.numel())


def text_perplexity(ids: list[int], windows: Windows, window_logits: Callable[[list[int]], torch.Tensor]) -> Perplexity:
    """The perplexity of ``ids`` under ``window_logits`` (a window's ids -> its logits (T, V), uncached)."""
    result = Perplexity()
    for start, end, first in windows.spans(len(ids)):
        logits = window_logits(ids[start:end])  # (end - start, V); row j predicts token start + j + 1
        result.add(logits[first - start - 1:end - start - 1], torch.tensor(ids[first:end]))
    return result


@torch.inference_mode()
def model_perplexity(model: torch.nn.Module, ids: list[int], windows: Windows, *, devices: ExecutionDevices,
                     dtype: torch.dtype, chunk: int = CHUNK) -> Perplexity:
    """neoxconv's model on ``ids``: each window ``chunk`` positions at a time through one KV cache."""
    result = Perplexity()
    for start, end, first in windows.spans(len(ids)):
        cache = KVCache(model.config, batch=1, max_len=end - start, device=devices.inputs, dtype=dtype,
                        layer_devices=list(devices.layers))
        for pos in range(0, end - start - 1, chunk):  # the window's last token predicts nothing inside it
            stop = min(pos + chunk, end - start - 1)
            logits = model(torch.tensor([ids[start + pos:start + stop]], device=devices.inputs), pos, cache)[0]
            lo = max(pos, first - start - 1)  # rows predicting scored tokens
            if lo < stop:
                result.add(logits[lo - pos:stop - pos], torch.tensor(ids[start + lo + 1:start + stop + 1]))
    return result


def close_enough(a: Perplexity, b: Perplexity, tolerance: float) -> tuple[bool, float]:
    """(agree, |difference of the mean NLLs| in nats/token = |log ppl_a - log ppl_b|)."""
    if a.tokens != b.tokens or not a.tokens:
        return False, float("nan")
    diff = abs(a.mean_nll - b.mean_nll)
    return diff <= tolerance, diff
