"""Training configuration: one dataclass, named presets, a YAML/JSON file and command-line overrides.

Precedence: dataclass defaults < `--preset` < `--config FILE` < explicit command-line options.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field

OBJECTIVES = ("masked", "next-frame", "reconstruction", "contrastive")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LOSS_BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# Options that change the model's parameters: a checkpoint only resumes under the same values.
MODEL_KEYS = (
    "objective", "channels", "patch_size", "tubelet", "embed_dim", "depth", "num_heads", "mlp_ratio",
    "decoder_dim", "decoder_depth", "proj_dim", "conv_width", "learn_temperature",
)

# Options that change only where a run writes and how it is watched: a resume with other values
# of these still continues exactly; any other change is named in a warning.
RESUME_FREE_KEYS = (
    "preset", "out_dir", "resume", "num_workers", "log_every", "eval_every", "eval_batches", "sample_every",
    "ckpt_every", "keep_last", "progress", "tensorboard", "wandb", "wandb_project",
)


class ConfigError(ValueError):
    """An invalid option value; the message names the option."""


@dataclass
class Stage:
    """One curriculum stage: square frames of `resolution` pixels, `frames` per clip, `steps` iterations."""

    resolution: int
    frames: int
    steps: int

    def __str__(self) -> str:
        return f"{self.resolution}x{self.frames}x{self.steps}"


@dataclass
class TrainConfig:
    """Every option of `wmkernels-train`; the help text of each is its `doc` metadata."""

    # run
    objective: str = field(default="masked", metadata={"doc": f"pre-training objective: {', '.join(OBJECTIVES)}"})
    preset: str = field(default="tiny", metadata={"doc": "named preset applied before the config file and options"})
    out_dir: str = field(default="runs/wmkernels", metadata={"doc": "checkpoints, metrics.jsonl, TensorBoard events, samples"})
    seed: int = field(default=0, metadata={"doc": "seed of the model init, data order, masks and augmentations"})
    device: str = field(default="auto", metadata={"doc": "auto (cuda if available), cpu or cuda"})
    threads: int = field(default=0, metadata={"doc": "torch intra-op threads per process (0: torch's default)"})
    # data
    data: str = field(default="synthetic", metadata={"doc": "'synthetic' or a folder of .mp4 / .npy clips"})
    num_samples: int = field(default=4096, metadata={"doc": "clips per epoch of the synthetic dataset"})
    channels: int = field(default=3, metadata={"doc": "channels per frame"})
    frame_stride: int = field(default=1, metadata={"doc": "take every n-th frame of a real clip"})
    eval_fraction: float = field(default=0.1, metadata={"doc": "share of a folder's clips held out for evaluation"})
    batch_size: int = field(default=8, metadata={"doc": "clips per process per micro-step"})
    num_workers: int = field(default=0, metadata={"doc": "DataLoader worker processes"})
    # model
    patch_size: int = field(default=4, metadata={"doc": "spatial patch size (pixels); the conv autoencoder downsamples by it"})
    tubelet: int = field(default=2, metadata={"doc": "frames per tubelet token (masked, contrastive)"})
    embed_dim: int = field(default=64, metadata={"doc": "transformer width"})
    depth: int = field(default=2, metadata={"doc": "transformer blocks of the encoder"})
    num_heads: int = field(default=4, metadata={"doc": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"doc": "MLP hidden width / embed_dim"})
    decoder_dim: int = field(default=32, metadata={"doc": "width of the masked-model decoder"})
    decoder_depth: int = field(default=1, metadata={"doc": "blocks of the masked-model decoder"})
    conv_width: int = field(default=16, metadata={"doc": "base channels of the reconstruction autoencoder"})
    proj_dim: int = field(default=32, metadata={"doc": "contrastive projection size"})
    mask_ratio: float = field(default=0.75, metadata={"doc": "tube mask ratio of the masked objective, in [0.75, 0.9] usually"})
    norm_pix: bool = field(default=True, metadata={"doc": "masked objective: per-patch normalized targets"})
    temperature: float = field(default=0.07, metadata={"doc": "contrastive temperature (initial value if learned)"})
    learn_temperature: bool = field(default=True, metadata={"doc": "learn the contrastive temperature"})
    # optimization
    lr: float = field(default=1e-4, metadata={"doc": "peak learning rate (AdamW)"})
    min_lr: float = field(default=0.0, metadata={"doc": "learning rate at the end of the cosine decay"})
    beta1: float = field(default=0.9, metadata={"doc": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"doc": "AdamW beta2"})
    weight_decay: float = field(default=0.05, metadata={"doc": "AdamW weight decay (not on biases, norms, embeddings, tokens)"})
    warmup_steps: int = field(default=1000, metadata={"doc": "linear warmup iterations, then cosine decay"})
    grad_clip: float = field(default=1.0, metadata={"doc": "max global gradient norm (0: no clipping)"})
    grad_accum: int = field(default=1, metadata={"doc": "micro-steps per optimizer step (the contrastive "
                                                 "objective's negatives are those of one micro-batch, gathered "
                                                 "over the processes)"})
    precision: str = field(default="fp32", metadata={"doc": "fp32, bf16 (autocast) or fp16 (autocast + GradScaler)"})
    grad_checkpointing: bool = field(default=False, metadata={"doc": "recompute each block in backward"})
    compile: bool = field(default=False, metadata={"doc": "run the model under torch.compile"})
    max_nonfinite: int = field(default=5, metadata={"doc": "stop after this many non-finite steps in a row"})
    loss_backend: str = field(default="auto", metadata={"doc": f"wmkernels loss backend: {', '.join(LOSS_BACKENDS)}"})
    # curriculum
    curriculum: list[Stage] = field(
        default_factory=lambda: [Stage(64, 8, 50_000), Stage(128, 8, 30_000), Stage(128, 16, 20_000)],
        metadata={"doc": "stages RESxFRAMESxSTEPS separated by commas, e.g. 32x4x100,64x8x50"},
    )
    steps: int = field(default=0, metadata={"doc": "if > 0, rescale the curriculum to this many iterations"})
    # monitoring and checkpoints
    log_every: int = field(default=50, metadata={"doc": "metrics to JSONL / TensorBoard every n iterations"})
    eval_every: int = field(default=1000, metadata={"doc": "held-out evaluation every n iterations (0: only at the end)"})
    eval_batches: int = field(default=4, metadata={"doc": "held-out batches per evaluation"})
    sample_every: int = field(default=1000, metadata={"doc": "sample GIF (prediction next to target) every n iterations"})
    ckpt_every: int = field(default=1000, metadata={"doc": "checkpoint every n iterations (and at the end)"})
    keep_last: int = field(default=3, metadata={"doc": "checkpoints kept on disk"})
    resume: str = field(default="", metadata={"doc": "checkpoint path, or 'auto' for OUT_DIR's latest (if any)"})
    progress: bool = field(default=True, metadata={"doc": "tqdm progress bar"})
    tensorboard: bool = field(default=True, metadata={"doc": "write TensorBoard events"})
    wandb: bool = field(default=False, metadata={"doc": "log to Weights & Biases (needs the wandb package)"})
    wandb_project: str = field(default="wmkernels", metadata={"doc": "Weights & Biases project"})

    def stages(self) -> list[Stage]:
        """The curriculum, rescaled to `steps` iterations when that is set."""
        if self.steps <= 0:
            return list(self.curriculum)
        total = sum(s.steps for s in self.curriculum)
        out, used = [], 0
        for i, s in enumerate(self.curriculum):
            later = len(self.curriculum) - 1 - i  # stages still to come keep at least one step each
            n = self.steps - used if not later else min(max(1, round(self.steps * s.steps / total)),
                                                        self.steps - used - later)
            out.append(Stage(s.resolution, s.frames, n))
            used += n
        return out

    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages())

    def model_config(self) -> dict:
        return {k: getattr(self, k) for k in MODEL_KEYS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # Seconds on a laptop CPU: shows the loss falling, writes checkpoints, samples and evaluations.
    # One thread: intra-op threads only add synchronization at these sizes (and thrash on a busy box).
    "tiny": dict(
        threads=1,
        curriculum=[Stage(16, 4, 120), Stage(32, 4, 60), Stage(32, 8, 40)],
        batch_size=8, num_samples=2048, patch_size=4, tubelet=2, embed_dim=64, depth=2, num_heads=4,
        decoder_dim=32, decoder_depth=1, conv_width=16, proj_dim=32, lr=1e-3, warmup_steps=20,
        log_every=10, eval_every=100, eval_batches=2, sample_every=100, ckpt_every=100,
    ),
    # Minutes on a GPU (or an hour on a CPU).
    "small": dict(
        curriculum=[Stage(32, 8, 3000), Stage(64, 8, 2000), Stage(64, 16, 1000)],
        batch_size=16, num_samples=16384, patch_size=8, tubelet=2, embed_dim=192, depth=6, num_heads=3,
        decoder_dim=96, decoder_depth=2, conv_width=32, proj_dim=128, lr=5e-4, warmup_steps=300,
        log_every=20, eval_every=500, eval_batches=8, sample_every=500, ckpt_every=500,
    ),
    # A real pre-training run (ViT-B sized encoder), low resolution -> high resolution -> long context.
    "base": dict(
        curriculum=[Stage(112, 8, 50_000), Stage(224, 8, 30_000), Stage(224, 16, 20_000)],
        batch_size=32, num_samples=1_000_000, patch_size=16, tubelet=2, embed_dim=768, depth=12, num_heads=12,
        decoder_dim=384, decoder_depth=4, conv_width=64, proj_dim=256, lr=1.5e-4, warmup_steps=5000,
        log_every=50, eval_every=2000, eval_batches=16, sample_every=1000, ckpt_every=1000, num_workers=8,
    ),
}


def parse_curriculum(text: str) -> list[Stage]:
    stages = []
    for part in text.split(","):
        bits = part.strip().lower().split("x")
        if len(bits) != 3 or not all(b.strip().isdigit() for b in bits):
            raise ConfigError(f"curriculum: expected stages like RESxFRAMESxSTEPS (e.g. 32x4x100,64x8x50), got {text!r}")
        stages.append(Stage(*(int(b) for b in bits)))
    return stages


def _coerce(name: str, value, kind):
    """`value` (from a file or the command line) as the field's type, or a ConfigError naming it."""
    if name == "curriculum":
        if isinstance(value, str):
            return parse_curriculum(value)
        if isinstance(value, list):
            try:
                stages = [s if isinstance(s, Stage) else Stage(**s) if isinstance(s, dict) else Stage(*s) for s in value]
            except TypeError as e:
                raise ConfigError(f"curriculum: expected a list of {{resolution, frames, steps}}, got {value!r}") from e
            return [Stage(*(_coerce(f"curriculum: stage {i + 1} {k}", getattr(s, k), int)
                            for k in ("resolution", "frames", "steps"))) for i, s in enumerate(stages)]
        raise ConfigError(f"curriculum: expected a list of stages or a string, got {value!r}")
    try:
        if kind in (int, float) and isinstance(value, bool):  # YAML's `yes` is no batch size
            raise ValueError(value)
        if kind is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from e


_HINTS = typing.get_type_hints(TrainConfig)
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_type(name: str):
    hint = _HINTS[name]
    return hint if hint in (int, float, str, bool) else list


def load_file(path: str) -> dict:
    """Options from a YAML or JSON file (keys are option names, with - or _)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config: file {path!r} not found")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config: {path!r} is not valid JSON: {e}") from e
    else:
        try:
            import yaml
        except ImportError as e:
            raise ConfigError("config: reading YAML needs PyYAML (pip install pyyaml), or use a .json file") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path!r} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path!r} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def make_config(overrides: dict | None = None, preset: str | None = None, file: str | None = None) -> TrainConfig:
    """Build and validate a config: defaults, then `preset`, then `file`, then `overrides`."""
    overrides = dict(overrides or {})
    from_file = load_file(file) if file else {}
    preset = overrides.pop("preset", None) or from_file.pop("preset", None) or preset or "tiny"
    from_file.pop("preset", None)
    if preset not in PRESETS:
        raise ConfigError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    values = {"preset": preset, **PRESETS[preset], **from_file, **overrides}
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown option (known: {', '.join(_FIELDS)})")
    cfg = TrainConfig(**{k: _coerce(k, v, _field_type(k)) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Reject invalid values before anything is built; each message names the option."""

    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{name}: expected {expected}, got {getattr(cfg, name)!r}")

    need(cfg.objective in OBJECTIVES, "objective", f"one of {', '.join(OBJECTIVES)}")
    need(cfg.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
    need(cfg.device in DEVICES, "device", f"one of {', '.join(DEVICES)}")
    need(cfg.loss_backend in LOSS_BACKENDS, "loss_backend", f"one of {', '.join(LOSS_BACKENDS)}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", "a positive number")
    need(0 <= cfg.min_lr <= cfg.lr, "min_lr", "a number in [0, lr]")
    need(0 <= cfg.beta1 < 1, "beta1", "a number in [0, 1)")
    need(0 <= cfg.beta2 < 1, "beta2", "a number in [0, 1)")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", "a finite number >= 0")
    need(cfg.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
    need(cfg.grad_clip >= 0, "grad_clip", "a number >= 0 (0 disables clipping)")
    need(0 <= cfg.mask_ratio < 1, "mask_ratio", "a number in [0, 1)")
    need(math.isfinite(cfg.temperature) and cfg.temperature > 0, "temperature", "a positive finite number")
    need(0 <= cfg.seed < 2**32, "seed", "an integer in [0, 2**32)")
    need(cfg.out_dir != "", "out_dir", "a folder path")
    for name in ("batch_size", "grad_accum", "patch_size", "tubelet", "embed_dim", "depth", "num_heads",
                 "decoder_dim", "decoder_depth", "conv_width", "proj_dim", "channels", "frame_stride",
                 "num_samples", "max_nonfinite", "keep_last", "eval_batches"):
        need(getattr(cfg, name) >= 1, name, "an integer >= 1")
    for name in ("threads", "num_workers", "steps", "log_every", "eval_every", "sample_every", "ckpt_every"):
        need(getattr(cfg, name) >= 0, name, "an integer >= 0")
    need(0 < cfg.eval_fraction < 1, "eval_fraction", "a number in (0, 1)")
    width = min(cfg.embed_dim, cfg.decoder_dim) if cfg.objective == "masked" else cfg.embed_dim
    need(math.isfinite(cfg.mlp_ratio) and int(width * cfg.mlp_ratio) >= 1, "mlp_ratio",
         f"a number that leaves an MLP hidden width >= 1 at width {width}")
    need(cfg.embed_dim % cfg.num_heads == 0, "embed_dim", f"a multiple of num_heads={cfg.num_heads}")
    if cfg.objective == "masked":  # the only objective with a decoder
        need(cfg.decoder_dim % cfg.num_heads == 0, "decoder_dim", f"a multiple of num_heads={cfg.num_heads}")
        patch_values = cfg.tubelet * cfg.patch_size ** 2 * cfg.channels
        if cfg.norm_pix and patch_values < 2:
            raise ConfigError(f"norm_pix: per-patch normalized targets need at least 2 values per patch, got "
                              f"tubelet x patch_size^2 x channels = {patch_values}; use --no-norm-pix or larger patches")
    if cfg.objective == "reconstruction":
        need(cfg.patch_size & (cfg.patch_size - 1) == 0, "patch_size", "a power of two for the conv autoencoder")
    need(len(cfg.curriculum) > 0, "curriculum", "at least one stage")
    frame_mult = 1 if cfg.objective in ("next-frame", "reconstruction") else cfg.tubelet
    for i, s in enumerate(cfg.curriculum):
        where = f"curriculum: stage {i + 1} ({s})"
        if s.resolution < 1 or s.resolution % cfg.patch_size:
            raise ConfigError(f"{where}: resolution {s.resolution} is not a positive multiple of patch_size={cfg.patch_size}")
        if s.steps < 1:
            raise ConfigError(f"{where}: steps must be >= 1")
        if cfg.objective == "next-frame" and s.frames < 2:
            raise ConfigError(f"{where}: next-frame needs at least 2 frames (context + target)")
        if s.frames < 1 or s.frames % frame_mult:
            raise ConfigError(f"{where}: frames {s.frames} is not a positive multiple of tubelet={cfg.tubelet}")
        if cfg.objective == "masked":
            spatial = (s.resolution // cfg.patch_size) ** 2
            if int(cfg.mask_ratio * spatial) >= spatial:
                raise ConfigError(f"mask_ratio: {cfg.mask_ratio} leaves no visible patch at resolution {s.resolution}")
            if int(cfg.mask_ratio * spatial) < 1:
                raise ConfigError(f"mask_ratio: {cfg.mask_ratio} masks no patch of the {spatial} per frame at "
                                  f"resolution {s.resolution}: nothing to predict")
    if cfg.steps and cfg.steps < len(cfg.curriculum):
        raise ConfigError(f"steps: expected 0 or at least one per curriculum stage ({len(cfg.curriculum)}), got {cfg.steps}")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wmkernels-train",
        description="Pre-train a small video world model with wmkernels losses "
        "(single process, or under torchrun --nproc_per_node N).",
        epilog="Values come from the built-in defaults, then --preset (tiny, small, base), then --config, "
        "then these options. A step with a non-finite loss (or gradient, outside fp16) is skipped and "
        "counted; after --max-nonfinite in a row the run saves a checkpoint and stops (exit code 3). "
        "Bad options, data paths or checkpoints exit with code 2 and a message naming what is wrong.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (applied after the preset)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        tiny = PRESETS["tiny"].get(f.name, default)
        help_text = f"{f.metadata['doc']} (default: {_show(default)}" + (
            f"; tiny preset: {_show(tiny)})" if tiny != default else ")")
        kind = _field_type(f.name)
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "preset":
            p.add_argument(flag, choices=sorted(PRESETS), default=None, help=help_text)
        else:
            p.add_argument(flag, type=str if kind is list else kind, default=None, metavar=f.name.upper(), help=help_text)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a validated config (exits with a message naming a bad option)."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    file = ns.pop("config")
    overrides = {k: v for k, v in ns.items() if v is not None}
    try:
        return make_config(overrides, file=file)
    except ConfigError as e:
        parser.error(str(e))
