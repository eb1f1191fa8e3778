"""gkv-jax: reasoning LLMs in JAX with a fixed-size, decoding-time-evicted KV cache (G-KV).

Shape letters used in every docstring:
  B batch, T tokens, C cache slots (capacity = budget + divide_length), S cached tokens
  scored at a compression, N query heads, K KV heads, G = N / K group size, H head dim,
  D model dim, F MLP width, V vocab, L layers, W observation window.
"""

from gkv_jax import (
    conversion,
    datasets,
    decode,
    distributed,
    engine,
    eviction,
    grading,
    policies,
    sharding,
    training,
)
from gkv_jax.cache import KVCache, init_cache
from gkv_jax.engine import Engine, RequestOutput
from gkv_jax.evaluation import EvalReport, evaluate
from gkv_jax.eviction import EvictionConfig
from gkv_jax.eviction_record import EvictionRecord
from gkv_jax.generation import GenerateOutput, generate
from gkv_jax.loading import load
from gkv_jax.models import ModelConfig, Transformer

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "EvalReport",
    "EvictionConfig",
    "EvictionRecord",
    "GenerateOutput",
    "KVCache",
    "ModelConfig",
    "RequestOutput",
    "Transformer",
    "conversion",
    "datasets",
    "decode",
    "distributed",
    "engine",
    "evaluate",
    "eviction",
    "generate",
    "grading",
    "init_cache",
    "load",
    "policies",
    "sharding",
    "training",
]
