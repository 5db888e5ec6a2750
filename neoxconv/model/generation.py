"""Generation as small functions: `prefill`, `decode_step`, `sample`, and `generate` which owns the cache."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from neoxconv.layers import NeoXForCausalLM
from neoxconv.model.kv_cache import KVCache


@dataclass(frozen=True)
class ExecutionDevices:
    """Where a model runs: the device its input ids go to, and each transformer layer's execution device
    (where that layer's KV cache lives). The loader that placed the model says so; nothing is read back
    from the model."""

    inputs: torch.device
    layers: tuple[torch.device, ...]

    @classmethod
    def resident(cls, model: NeoXForCausalLM) -> ExecutionDevices:
        """Every stage on the device of the model's weights (a model loaded whole, or built in memory)."""
        device = next((p.device for p in model.parameters() if not p.is_meta), None)
        if device is None:
            raise ValueError("every weight of this model is offloaded: pass the devices its loader placed it on "
                             "(LoadedModel.devices)")
        return cls(device, (device,) * len(model.blocks))


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; otherwise temperature, then top-k, then top-p (nucleus)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # written so that nan fails every test (nan < 0 is False too)
        if not 0 <= self.temperature < math.inf or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need a finite temperature >= 0, top_k >= 0 and 0 < top_p <= 1")


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    generated_ids: list[int]
    prompt_logits: torch.Tensor  # (P, V) fp32, from the prefill
    step_logits: torch.Tensor  # (N, V) fp32: the logits each new token was chosen from
    prefill_seconds: float
    decode_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    stopped_at_eos: bool = False

    @property
    def decode_tokens_per_second(self) -> float:
        n = len(self.step_seconds)
        return n / sum(self.step_seconds) if n and sum(self.step_seconds) > 0 else float("nan")


def prefill(model: NeoXForCausalLM, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt (B, P) through the model, filling the cache; logits (B, P, V)."""
    return model(ids, 0, cache)


def decode_step(model: NeoXForCausalLM, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token (B, 1) at position cache.length; logits (B, V)."""
    return model(token, cache.length, cache)[:, -1]


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > sampling.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu" else probs,
                             1, generator=generator).squeeze(-1).to(logits.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: NeoXForCausalLM, prompt_ids: list[int], *, max_new_tokens: int, eos_id: int | None = None,
             sampling: Sampling = Sampling(), dtype: torch.dtype | None = None,
             devices: ExecutionDevices | None = None) -> GenerationResult:
    """Greedy (or sampled) generation of up to ``max_new_tokens`` after the prompt, with a KV cache.

    ``devices``: where the model runs (``LoadedModel.devices``); None for a model resident on one device."""
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    devices = devices or ExecutionDevices.resident(model)
    device = devices.inputs
    dtype = dtype or model.input_embeddings.weight.dtype
    max_len = min(len(prompt_ids) + max_new_tokens, model.config.max_position_embeddings)
    if len(prompt_ids) >= model.config.max_position_embeddings:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model takes at most "
                         f"{model.config.max_position_embeddings - 1} before generating")
    cache = KVCache(model.config, batch=1, max_len=max_len, device=device, dtype=dtype,
                    layer_devices=list(devices.layers))
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed) if sampling.temperature else None

    _sync(device)
    t0 = time.perf_counter()
    prompt_logits = prefill(model, torch.tensor([prompt_ids], device=device), cache)[0].float()  # (P, V)
    logits = prompt_logits[-1:]
    _sync(device)
    prefill_seconds = time.perf_counter() - t0

    generated: list[int] = []
    step_logits: list[torch.Tensor] = []
    step_seconds: list[float] = []
    stopped = False
    t_decode = time.perf_counter()
    while len(generated) < max_len - len(prompt_ids):
        token = sample(logits, sampling, generator)  # (1,)
        step_logits.append(logits[0])
        generated.append(int(token.item()))
        if eos_id is not None and generated[-1] == eos_id:
            stopped = True
            break
        if len(generated) == max_len - len(prompt_ids):
            break
        t = time.perf_counter()
        logits = decode_step(model, token.view(1, 1), cache).float()  # (1, V)
        _sync(device)
        step_seconds.append(time.perf_counter() - t)
    decode_seconds = time.perf_counter() - t_decode
    return GenerationResult(
        prompt_ids=list(prompt_ids), generated_ids=generated, prompt_logits=prompt_logits.cpu(),
        step_logits=torch.stack(step_logits).cpu() if step_logits else torch.empty(0),
        prefill_seconds=prefill_seconds, decode_seconds=decode_seconds, step_seconds=step_seconds,
        stopped_at_eos=stopped,
    )


@torch.inference_mode()
def full_forward_logits(model: NeoXForCausalLM, ids: list[int], *,
                        devices: ExecutionDevices | None = None) -> torch.Tensor:
    """Logits (T, V) fp32 of one uncached forward over ``ids`` (``devices`` as for `generate`)."""
    devices = devices or ExecutionDevices.resident(model)
    return model(torch.tensor([ids], device=devices.inputs))[0].float().cpu()
