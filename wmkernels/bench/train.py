"""Training-driver benchmark (issue 5): steps/s of `wmkernels-train`'s loop against a bare minimal
loop doing the same math (same model, data order, masks, optimizer, schedule, autocast, clipping;
no logging, checks or checkpoints). Both return the final parameters, which must agree.

The driver contender runs `Trainer.fit()` with its per-step bookkeeping and monitoring on (loss
and grad-norm checks, progress counters, JSONL + TensorBoard every `log_every` steps) and the
one-off end-of-run evaluation, sample and checkpoint off; each call builds its trainer or loop
from scratch, so construction is timed too (amortized over `steps`).
"""
from __future__ import annotations

import tempfile

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .harness import Case
from ..train.config import Stage, make_config
from ..train.data import SyntheticVideo
from ..train.loop import AMP_DTYPES, Trainer, param_groups, warmup_cosine
from ..train.objectives import build_objective


def _config(objective: str, resolution: int, frames: int, steps: int, precision: str, out_dir: str, device: str):
    return make_config({
        "objective": objective, "curriculum": [Stage(resolution, frames, steps)], "batch_size": 8,
        "num_samples": 8 * steps, "precision": precision, "device": device, "threads": 0, "warmup_steps": 5,
        "lr": 1e-3, "out_dir": out_dir, "progress": False, "tensorboard": True, "log_every": 10,
        "eval_every": 0, "sample_every": 0, "ckpt_every": 0,
    })


def _params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float() for p in module.parameters()])


def driver(d: dict) -> torch.Tensor:
    trainer = Trainer(d["cfg"])
    trainer.fit()
    trainer.monitor.close()
    return _params(trainer.objective)


def bare_loop(d: dict) -> torch.Tensor:
    """The minimal loop: what a user would write by hand for the same math."""
    cfg = d["cfg"]
    stage = cfg.curriculum[0]
    device = torch.device(d["device"])
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg).to(device)
    opt = torch.optim.AdamW(param_groups(objective, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, stage.steps, cfg.min_lr / cfg.lr))
    data = SyntheticVideo(cfg.num_samples, stage.frames, stage.resolution, cfg.channels, cfg.seed)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    amp = AMP_DTYPES[cfg.precision]
    for step, (video, index) in zip(range(stage.steps), loader):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = objective(video.to(device), index.tolist(), step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return _params(objective)


def cases(device: str, quick: bool) -> list[Case]:
    shapes = [("masked", 16, 4, 6)] if quick else [
        ("masked", 32, 8, 40), ("next-frame", 32, 8, 40), ("reconstruction", 32, 8, 40), ("contrastive", 32, 8, 40)]
    precisions = ["fp32"] if quick or device == "cpu" else ["fp32", "bf16"]
    out = []
    for objective, res, frames, steps in shapes:
        for precision in precisions:
            def setup(objective=objective, res=res, frames=frames, steps=steps, precision=precision):
                # held by the inputs: the folder (logs of every timed call) goes when they do
                tmp = tempfile.TemporaryDirectory(prefix="wmkernels-bench-train-")
                cfg = _config(objective, res, frames, steps, precision, tmp.name, device)
                return {"cfg": cfg, "device": device, "tmp": tmp}

            out.append(Case(
                op="train", name=f"{objective}-{res}px-{frames}f-b8-{steps}steps-{precision}", size=steps,
                setup=setup, contenders={"bare-loop": bare_loop, "wmkernels-train": driver}, reference="bare-loop",
                # Bit for bit with one thread; with more, torch's CPU kernels may sum in another order
                # from run to run, and 40 AdamW steps carry that to ~1e-5 in a few parameters.
                rtol=1e-3, atol=1e-4, dtype={"fp32": "float32", "bf16": "bfloat16"}[precision],
                params={"objective": objective, "resolution": res, "frames": frames, "batch_size": 8,
                        "steps": steps, "precision": precision},
            ))
    return out
