"""The output directory of `gkv-jax post-train`: OUT/model and OUT/run checked before the
model loads (a finished run is reported, never overwritten), the training call with the
library's errors worded as flags, and the export and summary at the end.
"""

from __future__ import annotations

import json
import os

from gkv_jax.cli.args import CommandError


def _check_output_dir(output_dir: str, steps: int) -> tuple[str, str, bool]:
    """(OUT/model, OUT/run, whether the run there is already complete), checked before the
    model loads. OUT/model is never overwritten: it may hold a model only as the export of a
    finished run in OUT/run, which the same command then reports as complete."""
    for path in (output_dir, os.path.join(output_dir, "run")):
        if os.path.exists(path) and not os.path.isdir(path):
            raise CommandError(f"--output-dir: {path} is a file; give a directory")
    model_dir, run_dir = os.path.join(output_dir, "model"), os.path.join(output_dir, "run")
    if not (os.path.isdir(model_dir) and os.listdir(model_dir)):
        return model_dir, run_dir, False
    done = _finished_steps(run_dir)
    if done is None:
        raise CommandError(f"--output-dir: {model_dir} already holds a model; choose another "
                           f"--output-dir (nothing is overwritten)")
    if done < steps:
        raise CommandError(f"--output-dir: {model_dir} already holds a model, but the run in "
                           f"{run_dir} ended at step {done}, not {steps}; choose another "
                           f"--output-dir (nothing is overwritten)")
    return model_dir, run_dir, True


def _finished_steps(run_dir: str) -> int | None:
    """The last step a run logged in `run_dir`'s history (0 if none), None without a run."""
    from gkv_jax.training.run_dir import HISTORY_FILE, IDENTITY_FILE

    if not os.path.isfile(os.path.join(run_dir, IDENTITY_FILE)):
        return None
    steps = [0]
    history = os.path.join(run_dir, HISTORY_FILE)
    if os.path.isfile(history):
        with open(history, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and "eval" not in entry:
                    steps.append(int(entry.get("step", 0)))
    return max(steps)


def _train(run, args, run_dir: str, lines: list[int] | None = None):
    """`run()` (a `distill` / `grpo` call) with the library's errors worded for the command
    line: a bad example names its --dataset line, a run directory holding another run names
    the flags that differ."""
    from gkv_jax import training
    from gkv_jax.training.run_dir import describe_differences

    try:
        return run()
    except training.DataError as err:
        where = f"{args.dataset} line {lines[err.index]}: " if lines else ""
        raise CommandError(f"--dataset: {where}{err}") from err
    except training.RunDirError as err:
        if not err.differences:
            raise CommandError(f"--output-dir: {err}") from err
        flags = describe_differences(
            err.differences, lambda name: f"--{name.replace('_', '-')}"
            if name in vars(args) else name)
        raise CommandError(f"--output-dir: {run_dir} holds a different run ({flags}); use "
                           f"another --output-dir to start fresh, or the same flags to "
                           f"resume") from err


def _report_complete(model_dir: str, steps: int) -> None:
    print(f"this run is already complete ({steps} steps); its model is in {model_dir}")


def _export(model, tokenizer, model_dir: str) -> None:
    from gkv_jax.conversion import to_hf
    to_hf(model, model_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)


def _summary(history, model_dir, run_dir) -> None:
    steps = [e for e in history if "loss" in e]
    if steps:
        print(f"steps {steps[0]['step']}..{steps[-1]['step']}: loss {steps[0]['loss']:.4f} "
              f"-> {steps[-1]['loss']:.4f}")
    chosen = next((e["selection"] for e in reversed(history) if "selection" in e), None)
    if chosen is not None:  # --select-problems: which step the model is
        print(f"selected step {chosen['selected_step']} ({chosen['select_by']} "
              f"{chosen['score']:.3f} on the validation problems; 0 is the model before "
              f"training)")
    print(f"model:   {model_dir}\nhistory: {os.path.join(run_dir, 'history.jsonl')}\n"
          f"checkpoints: {os.path.join(run_dir, 'checkpoints')}")
