"""Run monitoring on rank 0: a tqdm progress bar, metrics to JSONL and TensorBoard (and Weights &
Biases when asked), and sample GIFs with the prediction next to the target."""
from __future__ import annotations

import functools
import json
import logging
import math
import os

import numpy as np
import torch

log = logging.getLogger("wmkernels.train")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: peak RSS
    except ImportError:
        return float("nan")


def video_strip(pred: torch.Tensor, target: torch.Tensor, max_clips: int = 4, min_size: int = 96) -> np.ndarray:
    """(T, H', W', 3) uint8 frames: for each clip, prediction (left) next to target (right), clips stacked."""
    def rows(v):
        v = v[:max_clips].detach().float().clamp(0, 1).cpu()
        if v.shape[2] == 1:
            v = v.expand(-1, -1, 3, -1, -1)
        return v[:, :, :3]

    p, t = rows(pred), rows(target)
    gap = torch.ones_like(p[..., :2])
    grid = torch.cat([torch.cat([p, gap, t], dim=-1)[i] for i in range(len(p))], dim=-2)  # (T, 3, H*, W*)
    scale = max(1, -(-min_size // p.shape[-2]))
    grid = grid.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    return (grid.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@functools.cache
def _summary_writer():
    """TensorBoard's SummaryWriter, or None with one warning per process (the benchmark builds a
    Monitor per case)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("monitor: TensorBoard logging skipped: pip install tensorboard (or 'wmkernels[train]')")
        return None
    return SummaryWriter


@functools.cache
def _pil_image():
    try:
        from PIL import Image
    except ImportError:
        log.warning("monitor: sample GIFs skipped: pip install pillow (or 'wmkernels[train]')")
        return None
    return Image


def save_gif(frames: np.ndarray, path: str, fps: int = 4) -> bool:
    """Writes the GIF; False without Pillow, which only the `train` extra brings (warned once)."""
    Image = _pil_image()
    if Image is None:
        return False
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return True


def _open_metrics(path: str, start_step: int):
    """metrics.jsonl for appending: a fresh run starts it anew; a resumed one keeps the rows up to its
    checkpoint's step and drops those logged after it by the interrupted run (they are logged again)."""
    if start_step == 0 or not os.path.isfile(path):
        return open(path, "w")
    with open(path) as f:
        kept = [line.rstrip("\n") + "\n" for line in f if _row_step(line) <= start_step]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return open(path, "a")


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line of a killed run: dropped


class Monitor:
    """Everything a run reports; a no-op on ranks other than 0."""

    def __init__(self, cfg, enabled: bool, total_steps: int, start_step: int) -> None:
        self.enabled = enabled
        self.bar = self.tb = self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.samples_dir = os.path.join(cfg.out_dir, "samples")
        self.jsonl = _open_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), start_step)
        if cfg.progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                log.warning("monitor: progress bar skipped: pip install tqdm (or 'wmkernels[train]')")
            else:
                self.bar = tqdm(total=total_steps, initial=start_step, desc=f"{cfg.objective}", dynamic_ncols=True)
        if cfg.tensorboard and _summary_writer() is not None:
            self.tb = _summary_writer()(os.path.join(cfg.out_dir, "tb"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                log.warning("monitor: --wandb given but wandb is not installed (pip install wandb); skipped")
            else:
                self.wandb = wandb
                wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), dir=cfg.out_dir, resume="allow")

    def step(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": prefix, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": float(v) for k, v in metrics.items()}, step=step)
        if prefix == "eval":
            self.message(f"step {step} eval: " + ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items()))

    def message(self, text: str) -> None:
        """A line above the progress bar (or to the log without one)."""
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            log.info("%s", text)

    def sample(self, step: int, pred: torch.Tensor, target: torch.Tensor) -> str | None:
        if not self.enabled:
            return None
        os.makedirs(self.samples_dir, exist_ok=True)
        frames = video_strip(pred, target)
        path = os.path.join(self.samples_dir, f"sample_{step:08d}.gif")
        if not save_gif(frames, path):
            path = None
        if self.tb is not None:
            self.tb.add_images("samples/prediction|target", frames, step, dataformats="NHWC")
        if self.wandb is not None:
            self.wandb.log({"samples": self.wandb.Video(frames.transpose(0, 3, 1, 2), fps=4, format="gif")}, step=step)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
