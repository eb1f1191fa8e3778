"""A post-training run's directory: `run.json` (what the run is), `history.jsonl` and Orbax
checkpoints, so that the same call again resumes it.

A run directory is checked before anything is written (`RunDir.check`) and claimed only once
every other check of the run has passed (`RunDir.open`), so a run refused at its start leaves
nothing behind. A directory whose run never saved a checkpoint or logged a step holds nothing
worth keeping: another run may take it over. With several processes (multi-host) Orbax writes
each process's shards and process 0 alone checks and writes run.json and the history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from gkv_jax.models.config import ModelConfig

IDENTITY_FILE = "run.json"
BEST = "best"  # `select_by`'s best parameters (gkv_jax.training.selection)
HISTORY_FILE = "history.jsonl"
CHECKPOINTS = "checkpoints"


class RunDirError(ValueError):
    """run_dir cannot hold this run: it holds another one, or files that are not a run's.

    Attributes:
      differences: (setting, value there, value now) when it holds another run, else [].
    """

    def __init__(self, message: str, differences=()):
        super().__init__(message)
        self.differences = list(differences)


def run_identity(kind: str, config, data_fingerprint: str, model_config: ModelConfig) -> dict:
    """What makes two runs the same run: the method, every setting but the checkpoint and
    evaluation periods, the data and the model's architecture."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields["eviction"] = config.eviction.describe()
    for name in ("checkpoint_every", "eval_every"):
        fields.pop(name)
    return {"kind": kind, "config": json.loads(json.dumps(fields, default=str)),
            "data": data_fingerprint, "model": repr(model_config)}


def fingerprint(*items) -> str:
    """A short hash of JSON-serialisable items (token ids, answers)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item, default=str).encode())
    return digest.hexdigest()[:16]


def check_run_dir(run_dir) -> str:
    """`run_dir` as a path string; ValueError unless it is a non-empty path."""
    if run_dir is None or not isinstance(run_dir, str | os.PathLike) or not os.fspath(run_dir):
        raise ValueError(f"run_dir must be a directory path, got {run_dir!r}")
    return os.fspath(run_dir)


def identity_differences(there: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(setting, value there, value now) for every setting two run identities differ in,
    eviction knobs one by one; the data and the model by name only."""
    differences = []
    for key in sorted(set(there) | set(now)):
        old, new = there.get(key), now.get(key)
        if old == new:
            continue
        if key == "config" and isinstance(old, dict) and isinstance(new, dict):
            for name in sorted(set(old) | set(new)):
                if old.get(name) == new.get(name):
                    continue
                if name == "eviction":
                    differences += _eviction_differences(old.get(name), new.get(name))
                else:
                    differences.append((name, old.get(name), new.get(name)))
        elif key == "data":
            differences.append(("data", "another dataset", "these examples"))
        elif key == "model":
            differences.append(("model", "another architecture", "this model's"))
        else:
            differences.append((key, old, new))
    return differences


def _eviction_differences(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """The knobs in which two `EvictionConfig.describe()` lines differ."""
    def fields(line):
        match = re.fullmatch(r"([^(]*)\((.*)\)", line or "")
        if match is None:
            return {"eviction": line}
        return {"policy": match.group(1),
                **dict(re.findall(r"(\w+)=([^,]+)(?:, |$)", match.group(2)))}

    old_fields, new_fields = fields(old), fields(new)
    return [(name, old_fields.get(name), new_fields.get(name))
            for name in sorted(set(old_fields) | set(new_fields))
            if old_fields.get(name) != new_fields.get(name)]


def describe_differences(differences, name_of=lambda name: name) -> str:
    """"steps: 3 there, 5 now; budget: 68 there, 40 now" (`name_of` renames a setting, e.g.
    to its command-line flag)."""
    return "; ".join(f"{name_of(name)}: {old} there, {new} now"
                     for name, old, new in differences)


class RunDir:
    """run_dir: run.json, history.jsonl, checkpoints/ (Orbax).

    `check()` reads only; `open()` creates the directory, writes run.json and the checkpoint
    manager. `restore`, `save`, `log`, `history`, `close` once open.
    """

    def __init__(self, run_dir: str, identity: dict, keep: int = 2):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.identity = identity
        self.keep = keep
        self.identity_path = os.path.join(self.run_dir, IDENTITY_FILE)
        self.history_path = os.path.join(self.run_dir, HISTORY_FILE)
        self.writer = jax.process_index() == 0
        self.manager = None

    def check(self) -> None:
        """Raises RunDirError unless run_dir is new, empty, this run's, or a run's that
        never saved a checkpoint or logged a step. Writes nothing."""
        if not self.writer:
            return
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise RunDirError(f"run_dir: {self.run_dir} is a file; give a directory")
        if not os.path.isdir(self.run_dir) or not os.listdir(self.run_dir):
            return
        if not os.path.isfile(self.identity_path):
            raise RunDirError(f"run_dir: {self.run_dir} is not empty and holds no "
                              f"{IDENTITY_FILE}; use an empty or new directory")
        existing = self._read_identity()
        if existing == self.identity or not self._has_progress():
            return
        differences = identity_differences(existing, self.identity)
        raise RunDirError(
            f"run_dir: {self.run_dir} holds a different run ({describe_differences(differences)}"
            f"); use another run_dir to start fresh, or the same settings to resume",
            differences)

    def open(self) -> None:
        """Claims run_dir (after `check`): run.json written, the checkpoint manager made."""
        if self.writer:
            os.makedirs(self.run_dir, exist_ok=True)
            existing = self._read_identity() if os.path.isfile(self.identity_path) else None
            if existing is not None and existing != self.identity:
                # taking over a run that made no progress: its step-0 entries and its
                # saved step-0 model (`select_by`) belong to the other run
                if os.path.isfile(self.history_path):
                    os.remove(self.history_path)
                shutil.rmtree(os.path.join(self.run_dir, BEST), ignore_errors=True)
            with open(self.identity_path, "w") as f:
                json.dump(self.identity, f, indent=1)
        self.manager = ocp.CheckpointManager(
            os.path.join(self.run_dir, CHECKPOINTS),
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True))

    def _read_identity(self) -> dict | None:
        try:
            with open(self.identity_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # unreadable: differs from every run

    def _has_progress(self) -> bool:
        """Whether the run there saved a checkpoint or logged a step."""
        checkpoints = os.path.join(self.run_dir, CHECKPOINTS)
        if os.path.isdir(checkpoints) and any(name.isdigit()
                                              for name in os.listdir(checkpoints)):
            return True
        # step 0's entries (the recipe's choices, the evaluation before training) are not
        # progress: a run that failed in its first step may still be taken over
        return any(entry.get("step", 0) > 0 for entry in self.history_entries())

    def history_entries(self) -> list[dict]:
        """The history's readable entries (a line cut off mid-write is skipped)."""
        if not os.path.isfile(self.history_path):
            return []
        entries = []
        with open(self.history_path) as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return [e for e in entries if isinstance(e, dict)]

    def restore(self, params, opt_state):
        """(step, params, opt_state) of the latest checkpoint, restored onto the shardings
        of the given ones (a mesh's shards: each device reads its own), or (0, the given
        ones)."""
        step = self.manager.latest_step()
        if step is None:
            self._truncate_history(0)
            return 0, params, opt_state
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding),
                              {"params": params, "opt_state": opt_state})
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        self._truncate_history(step)
        return step, restored["params"], restored["opt_state"]

    def save(self, step: int, params, opt_state) -> None:
        """An Orbax checkpoint of `step` (none if that step is saved already: a periodic
        checkpoint and `select_by`'s can fall on the same step)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(
            {"params": params, "opt_state": opt_state}), force=True)
        self.manager.wait_until_finished()

    def _truncate_history(self, step: int) -> None:
        """Drops history lines after `step` (written past the checkpoint resumed from)."""
        if not self.writer or not os.path.exists(self.history_path):
            return
        kept = [json.dumps(entry) + "\n" for entry in self.history_entries()
                if entry.get("step", 0) <= step]
        with open(self.history_path, "w") as f:
            f.writelines(kept)

    def log(self, entry: dict) -> None:
        if not self.writer:
            return
        with open(self.history_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def history(self) -> list[dict]:
        if not os.path.exists(self.history_path):
            return []
        with open(self.history_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
