"""The slot engine: continuous batching over fixed-size evicted caches.

* `core`: the pure, jit-compiled functions (`prefill_group`, `insert`, `run_cycle`) over the
  engine's `Slots`, built on `gkv_jax.decode`.
* `host`: `Engine`, the host loop (queue, streaming, cancellation, stats).
* `boundary`: `Engine`'s cycle boundaries (harvest, admit, dispatch, collect) and the
  programs they run (`compiled_programs` counts them).
* `requests`: `RequestOutput`, `TokenEvent`, and `as_generate_output` (engine outputs as a
  `GenerateOutput`, e.g. for `gkv_jax.training.batch_from_generation`).
"""

from gkv_jax.engine.boundary import compiled_programs
from gkv_jax.engine.core import Prefix, Slots, init_slots, insert, prefill_group, run_cycle
from gkv_jax.engine.host import Engine
from gkv_jax.engine.requests import RequestOutput, TokenEvent, as_generate_output

__all__ = ["Engine", "Prefix", "RequestOutput", "Slots", "TokenEvent", "as_generate_output",
           "compiled_programs", "init_slots", "insert", "prefill_group", "run_cycle"]
