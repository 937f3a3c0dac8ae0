"""`wmkernels-train` under torchrun with 2 CPU processes (gloo): it matches the 1-process run on the
same global batch, and a 2-process resume is bitwise identical to the uninterrupted 2-process run."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from wmkernels.train import checkpoint as ckpt_io

pytestmark = pytest.mark.slow

ARGS = ["--curriculum", "16x4x4", "--num-samples", "32", "--embed-dim", "32", "--num-heads", "2",
        "--decoder-dim", "16", "--proj-dim", "16", "--lr", "2e-3", "--warmup-steps", "1", "--threads", "1",
        "--loss-backend", "torch", "--log-every", "1", "--eval-every", "0", "--sample-every", "0",
        "--ckpt-every", "2", "--keep-last", "3", "--no-progress", "--no-tensorboard"]


def launch(out_dir, nproc: int, batch: int, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "wmkernels.train", *ARGS, "--batch-size", str(batch), "--out-dir", str(out_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ckpt_io.load(ckpt_io.CheckpointManager(str(out_dir)).latest())


def metric(out_dir, key: str) -> list[float]:
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return [r[key] for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("objective", ["masked", pytest.param("contrastive", marks=pytest.mark.skipif(
    importlib.util.find_spec("wmkernels.ops.contrastive_dist") is None,
    reason="this install has no distributed contrastive loss (wmkernels.ops.contrastive_dist)"))])
def test_two_processes_match_one_and_resume_bitwise(tmp_path, objective):
    # contrastive also runs its transformer blocks under activation checkpointing inside DDP
    two = launch(tmp_path / "two", 2, 2, "--objective", objective,
                 *(["--grad-checkpointing"] if objective == "contrastive" else []))
    one = launch(tmp_path / "one", 1, 4, "--objective", objective)
    assert two["step"] == one["step"] == 4 and two["world_size"] == 2
    # Same global batch, masks and augmentations: the same losses and gradient norms. (Parameters
    # are not compared: Adam turns rounding noise in exactly-zero gradients, like attention key
    # biases, into lr-sized steps.)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(metric(tmp_path / "two", key), metric(tmp_path / "one", key), rtol=1e-4)
    if objective != "masked":
        return
    resumed = launch(tmp_path / "resumed", 2, 2, "--objective", objective,
                     "--resume", str(tmp_path / "two" / "ckpt_00000002.pt"))
    for k, v in two["model"].items():
        assert torch.equal(resumed["model"][k], v), k
