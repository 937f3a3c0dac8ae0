"""The training loop: DDP under torchrun, autocast (+ GradScaler for fp16), AdamW with warmup +
cosine, clipping, accumulation, curriculum stages, the non-finite policy, checkpoints and resume.

Non-finite policy: a step whose loss (or, outside fp16, gradient norm) is not finite is skipped
(no parameter or optimizer-state update) and counted; after `max_nonfinite` such steps in a row
the run saves a checkpoint (the parameters are those of the last good step) and stops with
`TrainingStopped`. Under fp16, an overflowing gradient with a finite loss is the GradScaler's
business: it skips the step and lowers the scale; those steps are counted as `scaler_skipped`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt_io
from .config import RESUME_FREE_KEYS, ConfigError, TrainConfig
from .data import DataSource, DataStream
from .models import set_grad_checkpointing
from .monitor import Monitor, peak_memory_mb
from .objectives import build_objective

log = logging.getLogger("wmkernels.train")

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingStopped(RuntimeError):
    """The run stopped under the non-finite policy (a checkpoint of the last good state was saved)."""


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from torchrun's environment; nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device: expected a CUDA device for device='cuda', but torch sees none")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, local_rank, world, device


def check_loss_backend(cfg: TrainConfig, device: torch.device, world: int) -> None:
    """The chosen loss backend runs on `device`, and the contrastive objective has negatives to score."""
    if cfg.loss_backend != "auto":
        import wmkernels

        status = wmkernels.available_backends()[cfg.loss_backend]
        if not status.available or not ({device.type, "any"} & set(status.devices)):
            why = status.reason if not status.available else f"it runs on {', '.join(status.devices)} tensors"
            raise ConfigError(f"loss_backend: {cfg.loss_backend!r} cannot run the losses on {device.type} here ({why}); "
                              "use --loss-backend auto")
    if cfg.objective == "contrastive" and cfg.batch_size * world < 2:
        raise ConfigError("batch_size: the contrastive objective needs other clips as negatives: batch_size 1 in one "
                          "process scores each clip against itself only (a loss of 0); use batch_size >= 2")


def prepare_out_dir(cfg: TrainConfig, ckpt: ckpt_io.CheckpointManager, create: bool) -> None:
    """Create OUT_DIR (`create`: the writing rank); on every rank, refuse to start a fresh run over the
    checkpoints of another one, whose files would mix with this run's (and `keep_last` would then
    delete this run's older ones first)."""
    if create:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"out_dir: cannot create folder {cfg.out_dir!r}: {e.strerror or e}") from e
        if not os.access(cfg.out_dir, os.W_OK):
            raise ConfigError(f"out_dir: folder {cfg.out_dir!r} is not writable")
    found = ckpt.checkpoints()
    if found and not cfg.resume:
        raise ConfigError(f"out_dir: {cfg.out_dir!r} holds checkpoints of an earlier run ({os.path.basename(found[-1])}"
                          f"{' and more' if len(found) > 1 else ''}): continue it with --resume auto, or choose "
                          "another --out-dir")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, position embeddings, tokens and scalars."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "pos_embed" in name or "token" in name or "norm" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier per iteration: linear warmup to 1, then cosine decay to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Builds everything from a config; `run()` trains to the end of the curriculum."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.local_rank, self.world, self.device = setup_distributed(cfg)
        check_loss_backend(cfg, self.device, self.world)
        self.ckpt = ckpt_io.CheckpointManager(cfg.out_dir, cfg.keep_last)
        prepare_out_dir(cfg, self.ckpt, create=self.rank == 0)
        self.stages = cfg.stages()
        # real clips are probed now: a stage whose clips are too short fails here, not hours in
        self.source = DataSource(cfg)
        self.source.check_stages(self.stages, self.world)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.total_steps = sum(s.steps for s in self.stages)
        self.objective = build_objective(cfg).to(self.device)
        set_grad_checkpointing(self.objective, cfg.grad_checkpointing)
        self.objective.distributed = self.world > 1
        self.optimizer = torch.optim.AdamW(param_groups(self.objective, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.amp_dtype = AMP_DTYPES[cfg.precision]
        self.step, self.data_pos = 0, None
        self.counters = {"nonfinite_skipped": 0, "scaler_skipped": 0}
        self.consecutive_bad = 0
        self.window = {"loss": 0.0, "n": 0, "time": 0.0, "data_time": 0.0}  # the metrics since the last log
        self.history: list[dict] = []
        self.last_checkpoint = self.last_sample = None
        self._maybe_resume()
        # Built after a resume: the schedule is a pure function of the step and this run's options.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.warmup_steps, self.total_steps, cfg.min_lr / cfg.lr),
            last_epoch=self.step - 1)
        self.ddp = None
        if self.world > 1:
            self.ddp = DDP(self.objective, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.runner = self.objective if self.ddp is None else self.ddp
        if cfg.compile:
            self.runner = torch.compile(self.runner)
        self.monitor = Monitor(cfg, self.rank == 0, self.total_steps, self.step)

    # ---- checkpoints ----

    def state(self) -> dict:
        return {
            "model": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "stage": self.stage_index,
            "data": self.stream.state(),
            "counters": dict(self.counters),
            "consecutive_bad": self.consecutive_bad,
            "window": dict(self.window),
            "rng": ckpt_io.rng_state(),
            "config": self.cfg.to_dict(),
            "model_config": self.cfg.model_config(),
            "world_size": self.world,
        }

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            self.last_checkpoint = self.ckpt.save(self.state(), self.step)

    def _maybe_resume(self) -> None:
        cfg = self.cfg
        if not cfg.resume:
            return
        folder = cfg.out_dir if cfg.resume == "auto" else cfg.resume if os.path.isdir(cfg.resume) else None
        path = ckpt_io.CheckpointManager(folder).latest() if folder is not None else cfg.resume
        if path is None:
            if cfg.resume != "auto":
                raise ckpt_io.CheckpointError(f"resume: folder {folder!r} holds no checkpoint (ckpt_*.pt)")
            log.info("resume: no checkpoint in %s yet; starting from scratch", cfg.out_dir)
            return
        state = ckpt_io.load(path)
        ckpt_io.check_run_state(state, path)
        ckpt_io.check_model_config(state["model_config"], cfg.model_config(), path)
        changed = ckpt_io.changed_options(state["config"], cfg.to_dict(), RESUME_FREE_KEYS)
        if changed:
            log.warning("resume: %s was written with other options (%s): the run goes on with the new values, "
                        "no longer the same as an uninterrupted run", path, "; ".join(changed))
        if state["world_size"] != self.world:
            log.warning("resume: checkpoint written by %d processes, now %d: the data order changes",
                        state["world_size"], self.world)
        self.objective.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group, decay in zip(self.optimizer.param_groups, (cfg.weight_decay, 0.0)):  # this run's values
            group.update(betas=(cfg.beta1, cfg.beta2), weight_decay=decay, initial_lr=cfg.lr)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.counters = state["step"], state["counters"]
        self.consecutive_bad = state.get("consecutive_bad", 0)
        self.window = state.get("window", self.window)
        self.data_pos = (state["stage"], state["data"])
        ckpt_io.set_rng_state(state["rng"])
        log.info("resume: %s at step %d", path, self.step)

    # ---- data ----

    def _enter_stage(self, index: int) -> None:
        """Build the data pipeline of curriculum stage `index` (optimizer state is kept)."""
        cfg, stage = self.cfg, self.stages[index]
        self.stage_index = index
        train, held = self.source.datasets(stage.frames, stage.resolution)
        pos = self.data_pos[1] if self.data_pos and self.data_pos[0] == index else {"epoch": 0, "batch": 0}
        self.data_pos = None
        pin = self.device.type == "cuda"
        self.stream = DataStream(train, cfg.batch_size, self.rank, self.world, cfg.seed + index, cfg.num_workers,
                                 pin_memory=pin, **pos)
        self.eval_loader = torch.utils.data.DataLoader(held, batch_size=cfg.batch_size, shuffle=False)
        self.monitor.message(f"stage {index + 1}/{len(self.stages)}: {stage.resolution}px, {stage.frames} frames, "
                             f"{stage.steps} steps")

    # ---- steps ----

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_step(self) -> dict:
        """One optimizer iteration (grad_accum micro-steps); returns its loss, grad norm, lr and timings."""
        cfg = self.cfg
        t0 = time.perf_counter()
        data_time, loss_sum = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            td = time.perf_counter()
            video, index = next(self.stream)
            video = video.to(self.device, non_blocking=True)
            data_time += time.perf_counter() - td
            last = micro == cfg.grad_accum - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with self._autocast():
                    loss = self.runner(video, index.tolist(), self.step)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum = loss_sum + loss.detach().float()
        loss = loss_sum / cfg.grad_accum
        if self.world > 1:
            dist.all_reduce(loss)
            loss = loss / self.world
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.objective.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loss_v, norm_v = torch.stack([loss, grad_norm.float().to(loss.device)]).tolist()
        lr = self.scheduler.get_last_lr()[0]
        bad = not math.isfinite(loss_v) or (not math.isfinite(norm_v) and not self.scaler.is_enabled())
        skipped = bad
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            if not bad:
                self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = bad or self.scaler.get_scale() < scale
            self.counters["scaler_skipped"] += int(skipped and not bad)
        elif not bad:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            if skipped:  # the schedule advances per iteration, also over a skipped step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.step += 1
        self.counters["nonfinite_skipped"] += int(bad)
        self.consecutive_bad = self.consecutive_bad + 1 if bad else 0
        return {"loss": loss_v, "grad_norm": norm_v, "lr": lr, "time": time.perf_counter() - t0, "data_time": data_time}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.objective.eval()
        totals: dict[str, float] = {}
        n = 0
        for video, index in self.eval_loader:
            with self._autocast():
                metrics = self.objective.evaluate(video.to(self.device), index.tolist())
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n += 1
        self.objective.train()
        return {k: v / n for k, v in totals.items()}

    @torch.no_grad()
    def write_sample(self) -> None:
        video, index = next(iter(self.eval_loader))
        self.objective.eval()
        with self._autocast():
            pred, target = self.objective.visualize(video.to(self.device), index.tolist())
        self.objective.train()
        self.last_sample = self.monitor.sample(self.step, pred, target)

    # ---- the run ----

    def run(self) -> dict:
        """Train to the end of the curriculum, then evaluate, write a sample and a final checkpoint."""
        final_eval: dict = {}
        try:
            self.fit()
            if self.rank == 0:  # periodic actions skip the last step: they all happen here
                final_eval = self.evaluate()
                self.monitor.log(self.step, final_eval, "eval")
                self.write_sample()
                self.save_checkpoint()
        finally:
            self.monitor.close()
        return {"step": self.step, "history": self.history, "eval": final_eval, "checkpoint": self.last_checkpoint,
                "sample": self.last_sample, **self.counters}

    def fit(self) -> None:
        """The training iterations with their periodic logging, evaluation, samples and checkpoints."""
        cfg = self.cfg
        bounds = np.cumsum([s.steps for s in self.stages])
        window = self.window
        samples_per_step = cfg.batch_size * cfg.grad_accum * self.world
        if self.step >= self.total_steps:  # resumed at the end: the final evaluation and checkpoint need its data
            self._enter_stage(len(self.stages) - 1)
        while self.step < self.total_steps:
            self._enter_stage(int(np.searchsorted(bounds, self.step, side="right")))
            while self.step < bounds[self.stage_index]:
                out = self.train_step()
                if self.consecutive_bad >= cfg.max_nonfinite:
                    self.save_checkpoint()
                    raise TrainingStopped(
                        f"stopped at step {self.step}: {self.consecutive_bad} non-finite steps in a row "
                        f"(max_nonfinite={cfg.max_nonfinite}); the last good state is in "
                        f"{self.last_checkpoint or cfg.out_dir}. Lower --lr, use bf16/fp32, or check the data.")
                for k in ("time", "data_time"):
                    window[k] += out[k]
                if math.isfinite(out["loss"]):
                    window["loss"] += out["loss"]
                    window["n"] += 1
                self.monitor.step(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}")
                if cfg.log_every and self.step % cfg.log_every == 0:
                    self._log(out, window, samples_per_step)
                self._periodic(cfg.eval_every, lambda: self.monitor.log(self.step, self.evaluate(), "eval"))
                self._periodic(cfg.sample_every, self.write_sample)
                self._periodic(cfg.ckpt_every, self.save_checkpoint)

    def _periodic(self, every: int, action) -> None:
        if self.rank == 0 and every and self.step % every == 0 and self.step < self.total_steps:
            action()

    def _log(self, out: dict, window: dict, samples_per_step: int) -> None:
        stage = self.stages[self.stage_index]
        metrics = {
            # NaN when every step of the window was non-finite (skipped), never a perfect-looking 0
            "loss": window["loss"] / window["n"] if window["n"] else float("nan"),
            "lr": out["lr"],
            "grad_norm": out["grad_norm"],
            "samples_per_s": samples_per_step * self.cfg.log_every / max(window["time"], 1e-9),
            "data_time_share": window["data_time"] / max(window["time"], 1e-9),
            "peak_memory_mb": peak_memory_mb(self.device),
            "stage": self.stage_index + 1,
            "resolution": stage.resolution,
            "frames": stage.frames,
            **self.counters,
        }
        if self.scaler.is_enabled():
            metrics["scaler_scale"] = self.scaler.get_scale()
        self.history.append({"step": self.step, **metrics})
        self.monitor.log(self.step, metrics)
        window.update(loss=0.0, n=0, time=0.0, data_time=0.0)
