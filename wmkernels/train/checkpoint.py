"""Checkpoint files: atomic writes (temp file, fsync, rename), the last K kept, a `latest` pointer,
and the RNG states a bitwise-identical resume needs.

A run killed at any moment leaves `latest` naming a complete checkpoint: the pointer is replaced
only after the checkpoint it names is on disk, and old checkpoints are removed only after that.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import re

import numpy as np
import torch

log = logging.getLogger("wmkernels.train")

POINTER = "latest"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, unreadable, or from another model config)."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Call `write(file)` on a temp file next to `path`, fsync it, then rename it over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# what a resume reads (Trainer.state writes these and more)
REQUIRED_KEYS = frozenset({"model", "optimizer", "scaler", "step", "stage", "data", "counters", "rng", "config",
                           "model_config", "world_size"})


class CheckpointManager:
    """`ckpt_<step>.pt` files in `out_dir`, the last `keep_last` kept, `latest` naming the newest."""

    def __init__(self, out_dir: str, keep_last: int = 3) -> None:
        self.out_dir, self.keep_last = out_dir, keep_last

    def path(self, step: int) -> str:
        return os.path.join(self.out_dir, f"ckpt_{step:08d}.pt")

    def save(self, state: dict, step: int) -> str:
        os.makedirs(self.out_dir, exist_ok=True)
        path = self.path(step)
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write(os.path.join(self.out_dir, POINTER), lambda f: f.write(os.path.basename(path).encode() + b"\n"))
        # The one just written always stays, even below a higher-numbered file of an abandoned run.
        others = [p for p in self.checkpoints() if p != path]
        for old in others[:max(0, len(others) - (self.keep_last - 1))]:
            os.remove(old)
        for stale in glob.glob(os.path.join(self.out_dir, "*.tmp*")):  # left by a killed writer
            if not stale.endswith(f".tmp{os.getpid()}"):
                os.remove(stale)
        return path

    def checkpoints(self) -> list[str]:
        """Complete checkpoint files, oldest first."""
        if not os.path.isdir(self.out_dir):
            return []
        names = sorted((int(m.group(1)), n) for n in os.listdir(self.out_dir) if (m := _NAME.match(n)))
        return [os.path.join(self.out_dir, n) for _, n in names]

    def latest(self) -> str | None:
        """The checkpoint `latest` names, or the newest file when the pointer is missing; None if none."""
        pointer = os.path.join(self.out_dir, POINTER)
        if os.path.isfile(pointer):
            with open(pointer) as f:
                path = os.path.join(self.out_dir, f.read().strip())
            if os.path.isfile(path):
                return path
        found = self.checkpoints()
        return found[-1] if found else None


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"resume: checkpoint {path!r} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"resume: cannot read checkpoint {path!r}: {e}") from e


def check_run_state(state, path: str) -> None:
    """`state` is what Trainer.state() saved (a bare model state_dict, say, cannot resume a run)."""
    missing = sorted(REQUIRED_KEYS - set(state)) if isinstance(state, dict) else ["(not a mapping)"]
    if missing:
        raise CheckpointError(f"resume: {path!r} is not a checkpoint written by wmkernels-train (missing: "
                              f"{', '.join(missing)}); a bare model state_dict cannot resume a run")


def changed_options(saved: dict, current: dict, ignore: tuple[str, ...]) -> list[str]:
    """`name saved -> current` for each option (outside `ignore`) whose value differs from the checkpoint's."""
    return [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in current.items() if k not in ignore and saved.get(k) != v]


def check_model_config(saved: dict, current: dict, path: str) -> None:
    """A clear error when the checkpoint's model options differ from this run's."""
    diffs = [f"{k}={saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"resume: {path} was trained with a different model config: " + "; ".join(diffs))
