"""`NeoXConfig`: the model's shape and numerics, read from a NeoX YAML or a Hugging Face config.json.

The config is a frozen dataclass. Everything else (head size, rotary width, which source layer index holds
what) is derived from it, never from folder names or magic numbers.

Source layer indices of the NeoX pipeline layout, for ``num_layers = L``::

    0          embedding            (word_embeddings.weight)
    1          parameter-free stage (no file)
    2 .. L+1   transformer blocks 0 .. L-1
    L+2        parameter-free stage (no file)
    L+3        final layer norm     (norm.weight, norm.bias)
    L+4        readout              (final_linear.weight)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neoxconv.errors import CheckpointError, ConfigError
from neoxconv.smallfile import read_json_object, read_small_text

# tanh-approximated GELU is what NeoX's fused bias-GELU kernel computes; Hugging Face calls it gelu_fast.
GELU_TANH = "gelu_fast"
GELU_EXACT = "gelu"
# gated SiLU: NeoX's "swiglu" (linear1 = [up | gate] per rank) and its older "mlp_type: llama" (w1 gate, w3 up)
SWIGLU = "swiglu"
_ACTIVATIONS = (GELU_TANH, GELU_EXACT, SWIGLU)
LAYERNORM = "layernorm"
RMSNORM = "rmsnorm"
_NORMS = (LAYERNORM, RMSNORM)
# The two architectures neoxconv merges (one rule table each, see merge.py):
GPT_NEOX = "gpt_neox"  # LayerNorm, GELU MLP, fused per-head QKV, biases  -> GPTNeoXForCausalLM
LLAMA = "llama"  # RMSNorm, SwiGLU, (grouped-query) attention, full rotary, sequential residual -> LlamaForCausalLM
# gpt-neox's defaults for the norm epsilons (megatron/neox_arguments/neox_args.py)
NEOX_LAYERNORM_EPS = 1e-5
NEOX_RMSNORM_EPS = 1e-8
# A resource bound, not a model fact: every structure is per layer, and the largest models have ~100-200.
MAX_LAYERS = 10_000


@dataclass(frozen=True)
class NeoXConfig:
    """Shape and numerics of a GPT-NeoX model (defaults are GPT-NeoX-20B's)."""

    num_layers: int = 44
    hidden_size: int = 6144
    num_heads: int = 64
    vocab_size: int | None = 50432  # padded rows of the embedding; None until known
    intermediate_size: int | None = None  # None -> 4 * hidden_size
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    layernorm_eps: float = 1e-5  # the norm's epsilon: LayerNorm's, or RMSNorm's (NeoX rms_norm_epsilon)
    parallel_residual: bool = True  # NeoX "gpt_j_residual": x + attn(ln1(x)) + mlp(ln2(x))
    tie_word_embeddings: bool = False  # NeoX "no-weight-tying: true" means False here
    activation: str = GELU_TANH
    bos_token_id: int = 0
    eos_token_id: int = 0
    make_vocab_size_divisible_by: int = 128
    norm: str = LAYERNORM  # layernorm | rmsnorm
    num_kv_heads: int | None = None  # grouped-query attention when set and != num_heads
    attention_bias: bool = True  # NeoX use_bias_in_attn_linear
    mlp_bias: bool = True  # NeoX use_bias_in_mlp
    # gpt-neox sliding_window_width (Llama-style only -> MistralForCausalLM): a query at position p attends to
    # keys p - W .. p (get_attn_mask: triu(tril(1), -W); flash-attn window_size (W, -1)), i.e. W + 1 keys
    sliding_window: int | None = None
    reward_model: bool = False  # NeoX train_impl: rm -> *ForSequenceClassification (rm_linear -> score, 1 label)
    pad_token_id: int | None = None  # merge --pad-token-id; required for reward models (their score's position)
    # NeoX te_layernorm_mlp: the post-attention norm and MLP are Transformer Engine's LayerNormMLP (tanh gelu, ffn
    # size not rounded); the files must then hold its keys. Its effect on the output is in activation and
    # intermediate_size already, so it is not part of the config digest (`plan.fingerprint.config_digest`).
    te_layernorm_mlp: bool = field(default=False, metadata={"digest": False})

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_layers", "hidden_size", "num_heads", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be positive (an integer), got {getattr(self, name)!r}")
        if isinstance(self.num_layers, int) and self.num_layers > MAX_LAYERS:
            problems.append(f"num_layers {self.num_layers} is implausible (more than {MAX_LAYERS}); check the config")
        shapes_ok = not problems
        if shapes_ok and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("rotary_pct", "rotary_emb_base", "layernorm_eps"):  # NaN, inf and <= 0 are all wrong
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                problems.append(f"{name} must be positive (and finite), got {value!r}")
        if isinstance(self.rotary_pct, (int, float)) and self.rotary_pct > 1.0:
            problems.append(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        elif shapes_ok and not problems and self.rotary_dims % 2:
            problems.append(f"rotary dims {self.rotary_dims} (head_dim x rotary_pct) must be even")
        if self.activation not in _ACTIVATIONS:
            problems.append(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        for name in ("vocab_size", "intermediate_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                problems.append(f"{name} must be positive (an integer), got {value!r}")
        problems += self._architecture_problems()
        for name in ("sliding_window", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                                      or (name == "sliding_window" and value == 0)):
                problems.append(f"{name} must be a {'positive' if name == 'sliding_window' else 'non-negative'} "
                                f"integer, got {value!r}")
        if (isinstance(self.pad_token_id, int) and isinstance(self.vocab_size, int)
                and not isinstance(self.pad_token_id, bool) and self.pad_token_id >= self.vocab_size):
            problems.append(f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size})")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        if self.intermediate_size is None:  # normalise, so equal models compare equal
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)

    def _architecture_problems(self) -> list[str]:
        """The combinations neoxconv converts exactly: GPT-NeoX (20B-style) and Llama-style."""
        problems = []
        if self.norm not in _NORMS:
            return [f"norm must be one of {_NORMS}, got {self.norm!r}"]
        if self.num_kv_heads is not None and (
                self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            problems.append(f"num_kv_heads {self.num_kv_heads} must be positive and divide num_heads {self.num_heads}")
        if self.norm == RMSNORM:  # Llama-style
            if self.activation != SWIGLU:
                problems.append(f"rmsnorm models are converted with activation 'swiglu', got {self.activation!r}")
            if self.rotary_pct != 1.0:
                problems.append(f"rmsnorm (Llama-style) models need rotary_pct 1 (Llama rotates whole heads), "
                                f"got {self.rotary_pct}")
            if self.parallel_residual:
                problems.append("rmsnorm (Llama-style) models need gpt_j_residual false (sequential residual)")
        else:
            if self.activation == SWIGLU:
                problems.append("activation 'swiglu' is converted with norm 'rmsnorm' only (Llama-style)")
            if self.gqa:
                problems.append("grouped-query attention (num_kv_heads) is converted with norm 'rmsnorm' only")
            if not (self.attention_bias and self.mlp_bias):
                problems.append("GPT-NeoX (layernorm) models are converted with biases only")
            if self.sliding_window is not None:
                problems.append("sliding-window-width is converted for Llama-style (rmsnorm, -> MistralForCausalLM) "
                                "models only: transformers' GPT-NeoX has no sliding window")
        if self.sliding_window is not None and (self.attention_bias or self.mlp_bias):
            problems.append("sliding-window-width with biases (use_bias_in_attn_linear / use_bias_in_mlp): "
                            "transformers' MistralForCausalLM has no biases")
        if self.reward_model and self.tie_word_embeddings:
            problems.append("train_impl rm with tied embeddings: a reward model's readout is rm_linear "
                            "(set no-weight-tying: true, as gpt-neox trains reward models)")
        return problems

    # ----- derived values -------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        """GPT_NEOX or LLAMA: which rule table, config.json and reference layers apply."""
        return LLAMA if self.norm == RMSNORM else GPT_NEOX

    @property
    def causal_lm(self) -> bool:
        """A language model (readout final_linear -> vocabulary logits), not a reward model (rm_linear -> score)."""
        return not self.reward_model

    @property
    def hf_architecture(self) -> str:
        """The transformers class config.json names: {GPTNeoX, Llama, Mistral}For{CausalLM, SequenceClassification}."""
        family = "GPTNeoX" if self.architecture == GPT_NEOX else ("Mistral" if self.sliding_window else "Llama")
        return family + ("ForSequenceClassification" if self.reward_model else "ForCausalLM")

    @property
    def kv_heads(self) -> int:
        """Key/value heads (= num_heads without grouped-query attention)."""
        return self.num_kv_heads or self.num_heads

    @property
    def gqa(self) -> bool:
        """Grouped-query attention, as gpt-neox decides it: num_kv_heads set and != num_attention_heads."""
        return self.num_kv_heads is not None and self.num_kv_heads != self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dims(self) -> int:
        """Features of each head that RoPE rotates (the first ``rotary_pct`` of the head)."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def embedding_index(self) -> int:
        return 0

    @property
    def block_indices(self) -> range:
        """Source layer indices of the transformer blocks (2 .. L+1)."""
        return range(2, self.num_layers + 2)

    @property
    def final_norm_index(self) -> int:
        return self.num_layers + 3

    @property
    def readout_index(self) -> int:
        return self.num_layers + 4

    def with_(self, **changes: Any) -> NeoXConfig:
        return dataclasses.replace(self, **changes)

    # ----- Hugging Face config.json ---------------------------------------------------------------
    def to_hf_dict(self, *, torch_dtype: str = "float16") -> dict[str, Any]:
        """A config.json that transformers 4.x and 5.x both read (legacy rotary keys, explicit act)."""
        if self.vocab_size is None:
            raise ConfigError("vocab_size is unknown; it must be set from the embedding before writing config.json")
        d = self._llama_hf_dict(torch_dtype) if self.architecture == LLAMA else self._neox_hf_dict(torch_dtype)
        d["architectures"] = [self.hf_architecture]
        if self.reward_model:  # what save_pretrained writes for num_labels=1 (transformers 4.x and 5.x read it)
            d["id2label"], d["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
        if self.pad_token_id is not None:
            d["pad_token_id"] = self.pad_token_id
        return d

    def _neox_hf_dict(self, torch_dtype: str) -> dict[str, Any]:
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "intermediate_size": self.ffn_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_emb_base,
            "layer_norm_eps": self.layernorm_eps,
            "use_parallel_residual": self.parallel_residual,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.activation,
            "attention_bias": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": torch_dtype,
        }

    def _llama_hf_dict(self, torch_dtype: str) -> dict[str, Any]:
        """LlamaForCausalLM's config.json. rope_theta at the top level is what transformers 4.x reads;
        5.x reads rope_parameters (and converts a top-level rope_theta too): both are written. With a sliding
        window it is MistralForCausalLM's: transformers' ``sliding_window`` counts the keys a query sees, the
        query's own included (kv > q - sliding_window), gpt-neox's width the keys before it, so it is W + 1."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.num_layers,
            "intermediate_size": self.ffn_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rotary_emb_base,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rotary_emb_base},
            "rope_scaling": None,
            "rms_norm_eps": self.layernorm_eps,
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": torch_dtype,
        }
        if self.sliding_window is not None:  # Mistral: no bias settings, no pretraining_tp
            for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
                del d[key]
            d.update(model_type="mistral", sliding_window=self.sliding_window + 1)
        return d

    @classmethod
    def _from_llama_hf_dict(cls, d: dict[str, Any]) -> NeoXConfig:
        rope = _unscaled_rope(d)
        window = _hf_whole(d, "sliding_window", 0) if d.get("model_type") == "mistral" else 0
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json has hidden_act {d['hidden_act']!r}; Llama-style models use 'silu'")
        heads = _hf_whole(d, "num_attention_heads")
        head_dim = d.get("head_dim")
        if head_dim is not None and _hf_whole(d, "head_dim") * heads != _hf_whole(d, "hidden_size"):
            raise ConfigError(f"config.json has head_dim {head_dim} != hidden_size / num_attention_heads")
        return cls(
            num_layers=_hf_whole(d, "num_hidden_layers"),
            hidden_size=_hf_whole(d, "hidden_size"),
            num_heads=heads,
            num_kv_heads=_hf_whole(d, "num_key_value_heads", 0) or heads,
            vocab_size=_hf_whole(d, "vocab_size"),
            intermediate_size=_hf_whole(d, "intermediate_size"),
            max_position_embeddings=_hf_whole(d, "max_position_embeddings", 2048),
            rotary_pct=1.0,
            rotary_emb_base=_agreed("the rotary base", [
                (key, value) for key, value in (("rope_parameters.rope_theta", rope.get("rope_theta")),
                                                ("rope_theta", d.get("rope_theta"))) if value is not None], 10000.0),
            layernorm_eps=float(d.get("rms_norm_eps", 1e-6)),
            parallel_residual=False,
            activation=SWIGLU,
            norm=RMSNORM,
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=_hf_whole(d, "bos_token_id", 0),
            eos_token_id=_hf_whole(d, "eos_token_id", 0),
            sliding_window=window - 1 if window else None,
            **_hf_head(d),
        )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> NeoXConfig:
        if d.get("model_type") in ("llama", "mistral"):
            try:
                return cls._from_llama_hf_dict(d)
            except KeyError as e:
                raise ConfigError(f"config.json lacks the key {e.args[0]!r}") from None
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config.json has a bad value: {e}") from None
        if d.get("model_type") not in (None, "gpt_neox"):
            raise ConfigError(f"config.json has model_type {d.get('model_type')!r}, expected 'gpt_neox', 'llama' "
                              "or 'mistral'")
        rope = _unscaled_rope(d)
        try:
            return cls(
                num_layers=_hf_whole(d, "num_hidden_layers"),
                hidden_size=_hf_whole(d, "hidden_size"),
                num_heads=_hf_whole(d, "num_attention_heads"),
                vocab_size=_hf_whole(d, "vocab_size"),
                intermediate_size=_hf_whole(d, "intermediate_size", 0) or 4 * _hf_whole(d, "hidden_size"),
                max_position_embeddings=_hf_whole(d, "max_position_embeddings", 2048),
                rotary_pct=_agreed("the rotary share", [("rotary_pct", d.get("rotary_pct", _ABSENT)), (
                    "rope_parameters.partial_rotary_factor", rope.get("partial_rotary_factor", _ABSENT))], 0.25),
                rotary_emb_base=_agreed("the rotary base", [("rotary_emb_base", d.get("rotary_emb_base", _ABSENT)), (
                    "rope_theta", d.get("rope_theta", _ABSENT)),
                    ("rope_parameters.rope_theta", rope.get("rope_theta", _ABSENT))], 10000.0),
                layernorm_eps=float(d.get("layer_norm_eps", 1e-5)),
                parallel_residual=bool(d.get("use_parallel_residual", True)),
                activation=str(d.get("hidden_act", GELU_EXACT)),
                bos_token_id=_hf_whole(d, "bos_token_id", 0),
                eos_token_id=_hf_whole(d, "eos_token_id", 0),
                **_hf_head(d),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the key {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError, AttributeError) as e:  # int(inf) is an OverflowError
            raise ConfigError(f"config.json has a bad value: {e}") from None

    @classmethod
    def from_hf_json(cls, path: Path) -> NeoXConfig:
        d = read_json_object(Path(path), ConfigError, what="config.json")
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    # ----- NeoX YAML ------------------------------------------------------------------------------
    @classmethod
    def from_neox_dict(cls, raw: dict[str, Any]) -> NeoXConfig:
        """Build from NeoX arguments; keys may use hyphens or underscores."""
        d = {str(k).replace("-", "_"): v for k, v in raw.items()}
        missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(f"NeoX config lacks {', '.join(missing)}")
        problems: list[str] = []
        pos_emb = _word(d, "pos_emb", "rotary", problems)
        if pos_emb != "rotary":
            problems.append(f"pos-emb {pos_emb!r} (only 'rotary' is supported)")
        norm = _word(d, "norm", LAYERNORM, problems)
        if norm not in _NORMS:
            problems.append(f"norm {norm!r} (only 'layernorm' and 'rmsnorm' are supported)")
        activation = _word(d, "activation", "gelu", problems)
        old_llama_mlp = _word(d, "mlp_type", "regular", problems) == "llama"  # gpt-neox 2023-05..2024-09: w1/w2/w3
        if old_llama_mlp and activation not in ("silu", "swish"):
            problems.append(f"mlp_type 'llama' with activation {activation!r} (only 'silu' is supported)")
        elif not old_llama_mlp and activation not in ("gelu", SWIGLU):
            problems.append(f"activation {activation!r} (only 'gelu' and 'swiglu' are supported)")
        if d.get("gpt_j_tied"):
            problems.append("gpt_j_tied (shared layer norms) is not supported")
        if _as_bool(d.get("use_qk_layernorm", False)):
            problems.append("use_qk_layernorm is not supported")
        train_impl = _word(d, "train_impl", "normal", problems)
        if train_impl not in ("normal", "rm", "dpo", "kto", "reinforce"):
            problems.append(f"train_impl {train_impl!r} (gpt-neox has normal, dpo, kto, reinforce and rm)")
        if problems:
            raise ConfigError("unsupported NeoX config: " + "; ".join(problems))
        # tanh GELU: gpt-neox's fused bias-gelu, or Transformer Engine's LayerNormMLP (its gelu kernel is the tanh
        # form, TE common/util/math.h, whatever bias_gelu_fusion says)
        te_mlp = _as_bool(d.get("te_layernorm_mlp", False))
        fused = _as_bool(d.get("bias_gelu_fusion", False)) or te_mlp
        gated = old_llama_mlp or activation == SWIGLU
        try:
            hidden = _whole(d, "hidden_size")
            if old_llama_mlp:
                intermediate = llama_mlp_intermediate_size(hidden, _whole(d, "intermediate_size"))
            elif gated:
                intermediate = gated_intermediate_size(
                    hidden, intermediate_size=_whole(d, "intermediate_size"),
                    expansion_factor=d.get("expansion_factor"),
                    multiple_of=_whole(d, "mlp_multiple_of") or 1)
            else:  # TELayerNormMLP takes the size as it is (gpt-neox transformer_engine.py); ParallelMLP rounds it
                intermediate = ungated_intermediate_size(
                    hidden, intermediate_size=_whole(d, "intermediate_size"),
                    expansion_factor=d.get("expansion_factor"), multiple_of=_whole(d, "mlp_multiple_of") or 1,
                    rounded=not te_mlp)
            eps_key, eps_default = ("rms_norm_epsilon", NEOX_RMSNORM_EPS) if norm == RMSNORM else \
                ("layernorm_epsilon", NEOX_LAYERNORM_EPS)
            return cls(
                num_layers=_whole(d, "num_layers"),
                hidden_size=hidden,
                num_heads=_whole(d, "num_attention_heads"),
                num_kv_heads=_whole(d, "num_kv_heads") or None,
                vocab_size=_whole(d, "padded_vocab_size") or None,
                intermediate_size=intermediate,
                max_position_embeddings=_whole(d, "max_position_embeddings") or _whole(d, "seq_length") or 2048,
                rotary_pct=float(d.get("rotary_pct", 1.0)),
                rotary_emb_base=float(d.get("rotary_emb_base", 10000)),
                layernorm_eps=float(d.get(eps_key, eps_default)),
                parallel_residual=_as_bool(d.get("gpt_j_residual", False)),
                tie_word_embeddings=not _as_bool(d.get("no_weight_tying", False)),
                activation=SWIGLU if gated else (GELU_TANH if fused else GELU_EXACT),
                make_vocab_size_divisible_by=_whole(d, "make_vocab_size_divisible_by", 128),
                norm=norm,
                attention_bias=_as_bool(d.get("use_bias_in_attn_linear", True)),
                mlp_bias=False if old_llama_mlp else _as_bool(d.get("use_bias_in_mlp", True)),
                sliding_window=_whole(d, "sliding_window_width"),
                reward_model=train_impl == "rm",  # dpo/kto/reinforce train a language model: final_linear
                te_layernorm_mlp=te_mlp,
            )
        except (TypeError, ValueError, OverflowError) as e:  # int(.inf) is an OverflowError
            raise ConfigError(f"NeoX config has a bad value: {e}") from None

    @classmethod
    def from_neox_yaml(cls, *paths: Path) -> NeoXConfig:
        """Parse one or more NeoX YAML files (later files override earlier ones, as NeoX does)."""
        merged: dict[str, Any] = {}
        for path in paths:
            merged.update(read_neox_yaml(path))
        try:
            return cls.from_neox_dict(merged)
        except ConfigError as e:
            where = ", ".join(str(p) for p in paths)
            raise ConfigError(f"{where}: {e}") from None

    def tp_model_parallel_check(self, tp_degree: int) -> list[str]:
        """Problems that make this config impossible to split ``tp_degree`` ways (empty if none)."""
        problems = []
        if self.num_heads % tp_degree:
            problems.append(f"num_heads {self.num_heads} is not divisible by the TP degree {tp_degree}")
        if self.gqa and self.kv_heads % tp_degree:
            problems.append(f"num_kv_heads {self.kv_heads} is not divisible by the TP degree {tp_degree}")
        if self.ffn_size % tp_degree:
            problems.append(f"intermediate size {self.ffn_size} is not divisible by the TP degree {tp_degree}")
        if self.vocab_size is not None and self.vocab_size % tp_degree:
            problems.append(f"vocab_size {self.vocab_size} is not divisible by the TP degree {tp_degree}")
        return problems


def parallel_mlp_sizes(hidden_size: int, *, intermediate_size: Any = None, expansion_factor: Any = None,
                       multiple_of: int = 1, gated: bool = False, rounded: bool = True) -> tuple[int, int]:
    """(linear1's rows, linear2's inputs) as gpt-neox's ParallelMLP computes them (transformer.py, ea7aefd8):
    ffn = intermediate_size, or expansion_factor x h, or 4h; gated: ffn = int(ffn x 2/3) (both halves) and
    ffn_in = ffn // 2, else ffn_in = ffn; then ffn rounds up to a multiple of 2 x mlp_multiple_of and ffn_in to a
    multiple of mlp_multiple_of (``rounded=False``: Transformer Engine's LayerNormMLP, which takes the size as it is).
    """
    if multiple_of <= 0:
        raise ConfigError(f"mlp_multiple_of must be positive, got {multiple_of}")
    if intermediate_size:
        ffn = int(intermediate_size)
    elif expansion_factor:
        ffn = int(float(expansion_factor) * hidden_size)
    else:
        ffn = 4 * hidden_size
    if gated:
        ffn = int(ffn * 2 / 3)
    ffn_in = ffn // 2 if gated else ffn
    if not rounded:
        return ffn, ffn_in
    return 2 * multiple_of * -(-ffn // (2 * multiple_of)), multiple_of * -(-ffn_in // multiple_of)


def gated_intermediate_size(hidden_size: int, *, intermediate_size: Any = None, expansion_factor: Any = None,
                            multiple_of: int = 1) -> int:
    """Hugging Face ``intermediate_size`` of a gated (SwiGLU) gpt-neox MLP: its ``ffn_dim_in``
    (`parallel_mlp_sizes`); linear1 must hold exactly two halves of ffn_in rows."""
    rows, inputs = parallel_mlp_sizes(hidden_size, intermediate_size=intermediate_size,
                                      expansion_factor=expansion_factor, multiple_of=multiple_of, gated=True)
    if rows != 2 * inputs:
        raise ConfigError(f"intermediate size {intermediate_size or expansion_factor} with mlp_multiple_of "
                          f"{multiple_of} gives linear1 {rows} rows but linear2 {inputs} inputs (not two halves)")
    return inputs


def ungated_intermediate_size(hidden_size: int, *, intermediate_size: Any = None, expansion_factor: Any = None,
                              multiple_of: int = 1, rounded: bool = True) -> int | None:
    """Hugging Face ``intermediate_size`` of a GELU gpt-neox MLP (None: 4 x hidden, nothing set), by
    `parallel_mlp_sizes` (since 2024-09; before, the MLP was always 4h): linear1's rows and linear2's inputs must
    agree, else gpt-neox itself cannot run the model."""
    rows, inputs = parallel_mlp_sizes(hidden_size, intermediate_size=intermediate_size,
                                      expansion_factor=expansion_factor, multiple_of=multiple_of, rounded=rounded)
    if rows != inputs:
        size = intermediate_size or expansion_factor or f"4 x {hidden_size}"
        raise ConfigError(f"intermediate size {size} with mlp_multiple_of {multiple_of} gives linear1 {rows} rows but "
                          f"linear2 {inputs} inputs: gpt-neox's ParallelMLP cannot run such a model")
    return rows if intermediate_size or expansion_factor or rows != 4 * hidden_size else None


def llama_mlp_intermediate_size(hidden_size: int, intermediate_size: Any = None) -> int:
    """``mlp_type: llama`` (gpt-neox 2023-05 .. 2024-09, w1/w2/w3): intermediate_size as given, else
    int(2 x 4h / 3) rounded up to a multiple of 256 (LLaMAParallelMLP's multiple_of)."""
    if intermediate_size:
        return int(intermediate_size)
    ff = int(2 * hidden_size * 4 / 3)
    return 256 * -(-ff // 256)


def _whole(d: dict[str, Any], key: str, default: int | None = None, *, name: str | None = None) -> int | None:
    """``d[key]`` as an int (None when absent or empty): NeoX would fail on 2.5 layers or ``true`` heads,
    so a non-whole number is a ConfigError, never silently truncated. ``name`` spells the key in the message."""
    v = d.get(key)
    if v is None or v == "":
        return default
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) or not isinstance(v, (int, float, str)):
        raise ConfigError(f"{name or key.replace('_', '-')} must be a whole number, got {str(v)[:60]!r}")
    try:
        return int(v)
    except ValueError:  # a text that is not a number ("12 heads"); (int(inf) is an OverflowError, handled above)
        raise ConfigError(f"{name or key.replace('_', '-')} must be a whole number, got {v[:60]!r}") from None


def _hf_whole(d: dict[str, Any], key: str, default: int | None = None) -> int:
    """A whole-number field of a Hugging Face config.json (`_whole`'s rule); without a default it is required."""
    value = _whole(d, key, default, name=f"config.json has a bad value: {key}")
    if value is None:
        if key not in d:
            raise KeyError(key)
        raise ConfigError(f"config.json has a bad value: {key} must be a whole number, got {d[key]!r}")
    return value


def _hf_head(d: dict[str, Any]) -> dict[str, Any]:
    """The head settings of config.json: a reward model (``*ForSequenceClassification`` with one label),
    ``pad_token_id`` and tied embeddings. Another head (several labels, token classification, ...) is not a gpt-neox
    model. A classifier's ``tie_word_embeddings`` (kept from its base model, e.g. Llama 3.2's true) ties nothing:
    it has no readout of the vocabulary, and its score is its own tensor (gpt-neox's untied rm_linear)."""
    archs = d.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"config.json has a bad value: architectures {archs!r:.60}")
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    if classifier:
        labels = d.get("num_labels", len(d["id2label"]) if isinstance(d.get("id2label"), dict) else 2)
        if labels != 1:
            raise ConfigError(f"config.json is a sequence classifier with {labels} labels; gpt-neox reward models "
                              "(train_impl rm) have one")
    pad = d.get("pad_token_id")
    return {"reward_model": classifier, "pad_token_id": None if pad is None else _hf_whole(d, "pad_token_id"),
            "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)) and not classifier}


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _word(d: dict[str, Any], key: str, default: str, problems: list[str]) -> str:
    """``d[key]`` as text when it is a scalar; a container is a problem named by key, never turned into text
    (a YAML alias bomb is small as objects and huge as text)."""
    value = d.get(key, default)
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    problems.append(f"{key.replace('_', '-')} is a {type(value).__name__}, not a string")
    return default


def _yaml_loader():
    """``yaml.SafeLoader`` that refuses anchors and aliases: NeoX configs never use them, and aliases nested a
    few levels deep describe exponentially large values (a "billion laughs" config)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise ConfigError(f"line {event.start_mark.line + 1}: YAML anchors/aliases (&name, *name) are not "
                                  "allowed in a NeoX config; write the values out")
            return super().compose_node(parent, index)

    return NoAliasLoader


def read_neox_yaml(path: Path) -> dict[str, Any]:
    """Read a NeoX YAML config (JSON-like braces, comments, ``True``, trailing commas)."""
    import yaml

    try:
        text = read_small_text(Path(path), ConfigError)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config: {e}") from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (yaml.YAMLError, RecursionError, ValueError) as e:  # ValueError: an integer past Python's digit limit
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of NeoX arguments, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class TokenizerSettings:
    """What a NeoX config says about the tokenizer it trained with (not part of `NeoXConfig`: no weight depends on
    it). Paths as written in the YAML: relative ones are relative to the folder gpt-neox ran in."""

    tokenizer_type: str | None = None  # HFTokenizer | SPMTokenizer | GPT2BPETokenizer | HFGPT2Tokenizer | ...
    vocab_file: str | None = None
    merge_file: str | None = None


def tokenizer_settings(*paths: Path) -> TokenizerSettings:
    """``tokenizer_type``, ``vocab-file`` and ``merge-file`` of NeoX YAML files (later files override earlier)."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged.update({str(k).replace("-", "_"): v for k, v in read_neox_yaml(path).items()})

    def text(key: str) -> str | None:
        value = merged.get(key)
        return value.strip() or None if isinstance(value, str) else None

    return TokenizerSettings(text("tokenizer_type"), text("vocab_file"), text("merge_file"))


def padded_vocab_size(tokenizer_size: int, *, divisible_by: int, tp_degree: int) -> int:
    """The embedding rows NeoX allocates: round up to a multiple of divisible_by x tp_degree."""
    multiple = divisible_by * tp_degree
    return -(-tokenizer_size // multiple) * multiple


GPT_NEOX_20B = NeoXConfig()


def _unscaled_rope(d: dict[str, Any]) -> dict[str, Any]:
    """config.json's RoPE settings (transformers 5's ``rope_parameters``, else 4's ``rope_scaling``); any RoPE
    scaling is refused, for GPT-NeoX and Llama alike: neoxconv's layers and the gpt-neox checkpoints have none."""
    found: dict[str, Any] = {}
    for key in ("rope_parameters", "rope_scaling"):
        value = d.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"config.json has a bad value: {key} is {value!r:.40}, not an object")
        if value.get("rope_type", value.get("type", "default")) not in ("default", None):
            raise ConfigError(f"config.json uses RoPE scaling ({key}: {value.get('rope_type', value.get('type'))!r}), "
                              "which neoxconv's layers do not implement")
        found = found or value
    return found


_ABSENT = object()  # a key that config.json does not have


def _agreed(what: str, spellings: list[tuple[str, Any]], default: float) -> float:
    """One setting that config.json may spell several ways (transformers 4 reads one, 5 another): the spellings
    present must agree, or the two versions would load different models. `_ABSENT` values are skipped; any
    other is converted with float(), so a null is a bad value (TypeError) unless the caller leaves it out."""
    present = [(key, float(value)) for key, value in spellings if value is not _ABSENT]
    if len({value for _, value in present}) > 1:
        raise ConfigError(f"config.json gives {what} as " + ", ".join(f"{k} = {v:g}" for k, v in present)
                          + ": transformers versions read different ones; make them agree")
    return present[0][1] if present else default


def load_out_config(out: Path) -> NeoXConfig:
    """The config.json of a merged folder OUT (CheckpointError, exit 4, when there is none)."""
    path = Path(out) / "config.json"
    if not path.is_file():  # an input problem (exit 4), not a failed check
        raise CheckpointError(f"{out}: no config.json, so not a folder written by 'neoxconv merge'; "
                              "pass the OUT folder of a merge")
    return NeoXConfig.from_hf_json(path)
