"""`ModelConfig`: the architecture of a supported checkpoint, and presets of real ones.

One frozen, hashable dataclass describes Qwen2 (q/k/v bias), Llama (llama3 RoPE scaling)
and Qwen3 (q/k RMSNorm); it is passed to jitted functions as a static argument.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

FAMILIES = ("qwen2", "llama", "qwen3")
ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """The `rope_type: llama3` frequency rescaling of Llama 3.1 (and R1-Distill-Llama)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer of the Qwen2 / Llama / Qwen3 families.

    Attributes:
      family: "qwen2", "llama" or "qwen3" (the Hugging Face `model_type`).
      vocab_size: V.
      hidden_size: D.
      intermediate_size: F, the SwiGLU width.
      num_layers: L.
      num_heads: N query heads.
      num_kv_heads: K key/value heads (N % K == 0; G = N / K).
      head_dim: H.
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base.
      rope_scaling: None or `Llama3RopeScaling`.
      max_position_embeddings: the model's context length.
      tie_word_embeddings: the LM head reuses the embedding matrix.
      qkv_bias: q/k/v projections have biases (Qwen2).
      qk_norm: RMSNorm over the head dim of queries and keys before RoPE (Qwen3).
      bos_token_id, eos_token_ids, pad_token_id: special ids from the HF config (may be None/()).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """G = N / K query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Exact parameter count (embeddings and LM head counted once each if untied)."""
        d, f, n, k, h = (self.hidden_size, self.intermediate_size, self.num_heads,
                         self.num_kv_heads, self.head_dim)
        attention = d * n * h + 2 * d * k * h + n * h * d
        if self.qkv_bias:
            attention += n * h + 2 * k * h
        if self.qk_norm:
            attention += 2 * h
        per_layer = attention + 3 * d * f + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + d

    # ------------------------------------------------------------------ HF config mapping
    @classmethod
    def from_hf_config(cls, hf_config: Any) -> ModelConfig:
        """Builds a config from a `transformers` config object, a `config.json` dict or path.

        Raises:
          ValueError: for a model type or a field value that this library does not implement
            (sliding-window attention, RoPE scaling other than llama3, biases other than
            Qwen2's q/k/v, activations other than SiLU, ...), naming the field.
        """
        return _from_hf_dict(_as_dict(hf_config))

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` content of the equivalent Hugging Face checkpoint."""
        architectures = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                         "qwen3": "Qwen3ForCausalLM"}
        out: dict[str, Any] = {
            "architectures": [architectures[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.eos_token_ids:
            out["eos_token_id"] = (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                                   else list(self.eos_token_ids))
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.family in ("llama", "qwen3"):
            out["attention_bias"] = False
        if self.family == "llama":
            out["mlp_bias"] = False
        return out


def _as_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if isinstance(hf_config, str | os.PathLike):
        path = os.fspath(hf_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"hf_config: no config.json at {path!r}")
        with open(path) as f:
            return json.load(f)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(
        "hf_config must be a transformers config, a dict or a path to config.json, "
        f"got {type(hf_config).__name__}"
    )


def _rope_fields(cfg: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """Reads RoPE settings from either the transformers 5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` layout."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if params and not isinstance(params, dict):
        raise ValueError("rope_parameters: per-layer-type RoPE parameters are not supported")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling: rope_type {rope_type!r} is not supported (supported: {ROPE_TYPES})"
        )
    partial = merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    if rope_type == "default":
        return float(theta), None
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings") if k not in merged]
    if missing:
        raise ValueError(f"rope_scaling: llama3 RoPE scaling is missing {missing}")
    return float(theta), Llama3RopeScaling(
        factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
    )


def _reject(cfg: dict[str, Any], family: str) -> None:
    """Raises for HF fields whose non-default value changes the computation we implement."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
    if cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True: sliding-window attention is not supported")
    layer_types = cfg.get("layer_types") or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise ValueError(f"layer_types contains {other}: only 'full_attention' is supported")
    if family in ("llama", "qwen3") and cfg.get("attention_bias"):
        raise ValueError(f"attention_bias=True is not supported for {family}")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if cfg.get("quantization_config"):
        raise ValueError("quantization_config: quantized checkpoints are not supported")
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(field):
            raise ValueError(f"{field} is not supported")


def _from_hf_dict(cfg: dict[str, Any]) -> ModelConfig:
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not supported (supported: {FAMILIES})")
    _reject(cfg, family)
    rope_theta, rope_scaling = _rope_fields(cfg)
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim") or hidden // num_heads
    if family == "qwen2" and head_dim != hidden // num_heads:
        raise ValueError(
            f"head_dim={head_dim}: Qwen2 requires hidden_size / num_attention_heads "
            f"= {hidden // num_heads}"
        )
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])
                    if e is not None)
    return ModelConfig(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
    )


# ---------------------------------------------------------------------------- presets
PRESETS: dict[str, ModelConfig] = {
    "deepseek-r1-distill-qwen-1.5b": ModelConfig(
        family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        qkv_bias=True, bos_token_id=151646, eos_token_ids=(151643,)),
    "deepseek-r1-distill-qwen-7b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        qkv_bias=True, bos_token_id=151646, eos_token_ids=(151643,)),
    "deepseek-r1-distill-llama-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=Llama3RopeScaling(), max_position_embeddings=131072,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001,)),
    "qwen3-8b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False,
        qk_norm=True, bos_token_id=151643, eos_token_ids=(151645,)),
}


def preset(name: str) -> ModelConfig:
    """The config of a real checkpoint by name (see `PRESETS`)."""
    key = name.lower().split("/")[-1]
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[key]
