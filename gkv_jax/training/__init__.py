"""Post-training under eviction: exact masks, teacher-forced log-probs, the replay, and the
distillation and GRPO losses, steps and loops built on them.

* `batch_from_generation(out)`: a generation (with `return_eviction_record=True`) as a
  `TeacherForcedBatch` under the exact masks it recorded.
* `batch_from_completions(prompt_ids, completion_ids)`: traces that were not generated.
* `shard_batch(batch, mesh)`: a batch placed on a mesh (batch over `data`) for the steps.
* `token_log_probs(model, batch)`: [B, M] log-probs of the targets under the masks (equal to
  `generate`'s `logprobs`).
* `replay_evictions(model, eviction, batch)`: the masks a policy gives any token sequence,
  re-derived layer by layer with the code generation compresses with.
* `distill_loss`, `group_advantages`, `grpo_loss`; `distill_step`, `grpo_step` (`steps`);
  `distill(...)` (`distill_loop`), `grpo(...)` (`grpo_loop`), sharing `loop_common`, with
  `DistillConfig` / `GRPOConfig` (`configs`), their inputs checked by `inputs` and their run
  directories kept by `run_dir`; an unset learning rate is chosen for the model's size
  (`recipe`), and `select_by` returns the best validated step that keeps the full cache
  (`selection`).
"""

from gkv_jax.training.batch import (
    TeacherForcedBatch,
    batch_from_completions,
    batch_from_generation,
    shard_batch,
)
from gkv_jax.training.configs import (
    MAX_STEPS,
    DistillConfig,
    GRPOConfig,
    OptimizerConfig,
    make_optimizer,
)
from gkv_jax.training.distill_loop import distill
from gkv_jax.training.grpo_loop import grpo
from gkv_jax.training.inputs import DataError
from gkv_jax.training.log_probs import token_log_probs, token_log_probs_from_params
from gkv_jax.training.loop_common import evaluation_callback
from gkv_jax.training.losses import (
    distill_loss,
    distill_loss_from_params,
    group_advantages,
    grpo_loss,
    grpo_loss_from_params,
)
from gkv_jax.training.replay import replay_evictions, replay_from_params
from gkv_jax.training.run_dir import RunDirError
from gkv_jax.training.steps import distill_step, grpo_step

__all__ = [
    "MAX_STEPS",
    "DataError",
    "DistillConfig",
    "GRPOConfig",
    "OptimizerConfig",
    "RunDirError",
    "TeacherForcedBatch",
    "batch_from_completions",
    "batch_from_generation",
    "distill",
    "distill_loss",
    "distill_loss_from_params",
    "distill_step",
    "evaluation_callback",
    "group_advantages",
    "grpo",
    "grpo_loss",
    "grpo_loss_from_params",
    "grpo_step",
    "make_optimizer",
    "replay_evictions",
    "replay_from_params",
    "shard_batch",
    "token_log_probs",
    "token_log_probs_from_params",
]
