"""Which evaluated step a post-training run returns (`select_by`): the guard that makes a
run do no harm on the measure it is judged by.

With `config.select_by` set (a key of `eval_fn`'s dict, e.g. "gkv@68"), the loop evaluates
the model before its first update (step 0) and at every evaluation after, and returns the
evaluated parameters with the highest `select_by` among the steps whose full-cache score
(`eval["full"]`, when the evaluation has one) is within `full_cache_tolerance` of step 0's;
of steps with the same `select_by`, the higher full-cache score wins, then the earlier step.
Step 0 always qualifies, so the run returns the model it was given unless training improved
it. The best parameters are kept on disk (run_dir/best/), never as a second copy in memory,
and a regular checkpoint is saved with each new best, so a resumed run knows its best.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp

from gkv_jax.training.run_dir import BEST, RunDir

FULL_CACHE_KEY = "full"


class Selection:
    """The best evaluated step so far of a run with `select_by` (see the module docstring).

    Attributes:
      step, score: the best step and its `select_by` score (None before any evaluation).
    """

    def __init__(self, run: RunDir, select_by: str, tolerance: float):
        self.run, self.key, self.tolerance = run, select_by, tolerance
        self.directory = os.path.join(run.run_dir, BEST)
        self.step: int | None = None
        self.score: float | None = None
        self.full: float = 0.0  # the best step's full-cache score (ties on `score`)
        self.full_before: float | None = None

    def _qualifies(self, evaluation: dict) -> bool:
        if self.full_before is None or FULL_CACHE_KEY not in evaluation:
            return True
        return evaluation[FULL_CACHE_KEY] >= self.full_before - self.tolerance - 1e-12

    def _score(self, step: int, evaluation: dict) -> float:
        if not isinstance(evaluation, dict) or self.key not in evaluation:
            keys = sorted(evaluation) if isinstance(evaluation, dict) else evaluation
            raise ValueError(f"select_by: eval_fn returned {keys} at step {step}, without "
                             f"{self.key!r}")
        return float(evaluation[self.key])

    def _record(self, step: int, evaluation: dict) -> bool:
        """Takes an evaluation into account; returns whether it is the new best (the only
        rule, shared by a live run and a resume)."""
        score = self._score(step, evaluation)
        if step == 0:
            self.full_before = evaluation.get(FULL_CACHE_KEY)
        full = float(evaluation.get(FULL_CACHE_KEY, 0.0))
        if not self._qualifies(evaluation) or (
                self.score is not None and (score, full) <= (self.score, self.full)):
            return False
        self.step, self.score, self.full = step, score, full
        return True

    def offer(self, step: int, evaluation: dict, params, opt_state,
              checkpoint: bool = True) -> bool:
        """Records an evaluation of `params` at `step`; returns whether it is the new best
        (its parameters are then saved, and with `checkpoint` a regular checkpoint of the
        step, so that a resume keeps the evaluation that chose it)."""
        if not self._record(step, evaluation):
            return False
        self._save(step, params)
        if step and checkpoint:
            self.run.save(step, params, opt_state)
        return True

    def resume(self, history: list[dict]) -> None:
        """Rebuilds the best from a resumed run's logged evaluations (all at or before its
        checkpoint: a new best always saves one)."""
        for entry in history:
            if "eval" in entry:
                self._record(entry["step"], entry["eval"])

    def best_params(self, params, final_step: int):
        """The parameters of the best step (`params` themselves when that is `final_step`)."""
        if self.step is None or self.step == final_step:
            return params
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding), params)
        return ocp.StandardCheckpointer().restore(self.path(self.step), target)

    def summary(self) -> dict:
        return {"selected_step": self.step, "select_by": self.key, "score": self.score,
                "full_cache_before": self.full_before, "tolerance": self.tolerance}

    def path(self, step: int) -> str:
        """Where the parameters of `step` are kept while it is the best."""
        return os.path.join(self.directory, str(step))

    def _save(self, step: int, params) -> None:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(self.path(step), params, force=True)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:  # only the new best is kept
            for name in os.listdir(self.directory):
                if name != str(step):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            with open(os.path.join(self.directory, "best.json"), "w") as f:
                json.dump({"step": step, "score": self.score}, f)


__all__ = ["FULL_CACHE_KEY", "Selection"]
