"""Training data: procedural bouncing-shape videos (the default), clips from a folder of .mp4 / .npy
files, and a resumable, rank-sharded stream of batches.

Every item is `(clip, index)`: a float32 (T, C, H, W) clip in [0, 1] and its dataset index, from
which masks and augmentations are derived, so they do not depend on the number of processes.
"""
from __future__ import annotations

import logging
import os
import random
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

log = logging.getLogger("wmkernels.train")

CLIP_SUFFIXES = (".mp4", ".npy")


class DataError(ValueError):
    """A data folder that cannot feed the run (missing, empty, no usable clip)."""


def sample_seed(seed: int, index: int, step: int = 0, salt: int = 0) -> int:
    """A 63-bit seed that is a pure function of (seed, sample index, step, salt)."""
    state = np.random.SeedSequence([seed, index, step + 1, salt]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_generator(seed: int, index: int, step: int = 0, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, index, step, salt))


def _bounce(p0: np.ndarray, v: np.ndarray, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position at times t of a point moving at speed v, reflected at the walls lo and hi."""
    span = hi - lo
    q = np.mod(p0 - lo + v * t, 2 * span)
    return lo + np.where(q < span, q, 2 * span - q)


class SyntheticVideo(Dataset):
    """Textured circles and squares bouncing off the walls over a colour gradient.

    A clip is a pure function of (seed, index): the scene lives in unit coordinates, so the same
    index at a higher resolution or with more frames shows the same scene in more detail or longer.
    """

    def __init__(self, num_samples: int, frames: int, resolution: int, channels: int = 3, seed: int = 0) -> None:
        self.num_samples, self.frames, self.resolution, self.channels, self.seed = (
            num_samples, frames, resolution, channels, seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        rng = np.random.default_rng(sample_seed(self.seed, index, salt=11))
        T, R, C = self.frames, self.resolution, self.channels
        coords = (np.arange(R, dtype=np.float32) + 0.5) / R
        yy, xx = coords[None, :, None], coords[None, None, :]
        t = np.arange(T, dtype=np.float32)[:, None, None]
        c0, c1 = rng.uniform(0.0, 0.5, C), rng.uniform(0.0, 0.5, C)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = 0.5 + 0.5 * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5))  # (1, 1, R) + (1, R, 1)
        video = (c0[:, None, None, None] * (1 - ramp) + c1[:, None, None, None] * ramp) * np.ones((1, T, 1, 1))
        for _ in range(rng.integers(2, 4)):
            r = rng.uniform(0.12, 0.22)
            cx = _bounce(rng.uniform(r, 1 - r), rng.uniform(-0.06, 0.06), t, r, 1 - r)
            cy = _bounce(rng.uniform(r, 1 - r), rng.uniform(-0.06, 0.06), t, r, 1 - r)
            dx, dy = xx - cx, yy - cy
            inside = dx * dx + dy * dy < r * r if rng.random() < 0.5 else np.maximum(abs(dx), abs(dy)) < r * 0.85
            freq, theta = rng.uniform(15, 40), rng.uniform(0, np.pi)
            if rng.random() < 0.5:  # stripes
                texture = 0.5 + 0.5 * np.sin(freq * (dx * np.cos(theta) + dy * np.sin(theta)))
            else:  # checkerboard
                texture = ((np.floor(dx * freq / 3) + np.floor(dy * freq / 3)) % 2).astype(np.float32)
            color = rng.uniform(0.4, 1.0, C)[:, None, None, None]
            video = np.where(inside[None], color * (0.55 + 0.45 * texture[None]), video)
        clip = torch.from_numpy(np.ascontiguousarray(video.transpose(1, 0, 2, 3), dtype=np.float32))
        return clip.clamp_(0, 1), index


def _to_frames(array: np.ndarray) -> torch.Tensor:
    """A decoded clip (T, H, W), (T, H, W, C) uint8 or float in [0, 1] as float32 (T, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(array))
    if x.ndim == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _fit(clip: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """Center-crop to a square, resize to `resolution`, and match the channel count."""
    _, c, h, w = clip.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    clip = clip[:, :, top:top + side, left:left + side]
    if side != resolution:
        clip = F.interpolate(clip, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    if c != channels:  # grey <-> RGB
        if c not in (1, 3) or channels not in (1, 3):
            raise DataError(f"data: cannot turn {c}-channel frames into channels={channels}")
        clip = clip.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return clip.clamp(0, 1).contiguous()


def _import_av():
    try:
        import av
    except ImportError as e:
        raise DataError("data: reading .mp4 clips needs PyAV: pip install 'wmkernels[video]' (or pip install av)") from e
    return av


def _clip_length(path: str) -> int:
    """Number of frames of a clip file (raises on an unreadable file)."""
    if path.endswith(".npy"):
        return int(np.load(path, mmap_mode="r").shape[0])
    av = _import_av()
    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def _read_clip(path: str, start: int, count: int, stride: int) -> np.ndarray:
    if path.endswith(".npy"):
        return np.array(np.load(path, mmap_mode="r")[start:start + count * stride:stride])  # a writable copy
    av = _import_av()
    frames = []
    with av.open(path) as container:
        for k, frame in enumerate(container.decode(container.streams.video[0])):
            if k >= start and (k - start) % stride == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == count:
                    break
    return np.stack(frames)


def list_clips(root: str) -> list[str]:
    """Clip files of a folder (recursively, sorted); a clear error when there are none."""
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise DataError(f"data: {root!r} {what} (use --data synthetic or a folder of .mp4/.npy clips)")
    files = sorted(
        os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.lower().endswith(CLIP_SUFFIXES)
    )
    if not files:
        raise DataError(f"data: folder {root!r} holds no .mp4 or .npy clips")
    return files


class ClipFolder(Dataset):
    """Clips of `frames` frames (every `frame_stride`-th) from .mp4 (PyAV) or .npy files.

    .npy files hold (T, H, W[, C]) arrays, uint8 in [0, 255] or float in [0, 1]. Unreadable files
    and files shorter than `frames * frame_stride` are skipped with a count in the log; the clip
    start within a file is a pure function of (seed, index).
    """

    def __init__(self, files: list[str], frames: int, resolution: int, channels: int = 3, frame_stride: int = 1,
                 seed: int = 0, lengths: dict[str, int] | None = None) -> None:
        self.frames, self.resolution, self.channels, self.stride, self.seed = frames, resolution, channels, frame_stride, seed
        lengths = probe_lengths(files) if lengths is None else lengths
        need = (frames - 1) * frame_stride + 1
        unreadable = [f for f in files if lengths.get(f, -1) < 0]
        short = [f for f in files if 0 <= lengths.get(f, -1) < need]
        self.files = [f for f in files if lengths.get(f, -1) >= need]
        self.lengths = [lengths[f] for f in self.files]
        if unreadable or short:
            log.warning("data: skipped %d of %d clips (%d unreadable, %d shorter than %d frames)",
                        len(unreadable) + len(short), len(files), len(unreadable), len(short), need)
        self.skipped = len(unreadable) + len(short)
        if not self.files:
            raise DataError(
                f"data: none of {len(files)} clips is usable ({len(unreadable)} unreadable, "
                f"{len(short)} shorter than {need} frames = frames x frame_stride)")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        for k in range(len(self.files)):  # an unreadable file mid-run: take the next clip, never crash
            i = (index + k) % len(self.files)
            need = (self.frames - 1) * self.stride + 1
            start = random.Random(sample_seed(self.seed, i, salt=13)).randrange(self.lengths[i] - need + 1)
            try:
                array = _read_clip(self.files[i], start, self.frames, self.stride)
                if len(array) == self.frames:
                    return _fit(_to_frames(array), self.resolution, self.channels), index
            except DataError as e:  # the options cannot fit this clip (channels): every clip would fail alike
                raise DataError(f"{e} ({self.files[i]})") from None
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("data: cannot read %s (%s); using the next clip", self.files[i], e)
        raise DataError("data: no clip of the folder could be read")


def probe_lengths(files: list[str]) -> dict[str, int]:
    """Frame count per file, -1 for a file that cannot be read."""
    out = {}
    for f in files:
        try:
            out[f] = _clip_length(f)
        except DataError:
            raise
        except Exception as e:  # any decoder failure marks the file unreadable
            log.debug("data: %s unreadable: %s", f, e)
            out[f] = -1
    return out


def split_files(files: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """A deterministic train / held-out split by file name (at least one clip each when possible)."""
    held = [f for f in files if zlib.crc32(os.path.basename(f).encode()) % 10_000 < eval_fraction * 10_000]
    if not held:
        held = files[-1:]
    train = [f for f in files if f not in held] or files
    return train, held


class DataSource:
    """Builds the train and held-out datasets of a config for each curriculum stage."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        if cfg.data != "synthetic":
            files = list_clips(cfg.data)
            self.lengths = probe_lengths(files)
            self.train_files, self.eval_files = split_files(files, cfg.eval_fraction)

    def check_stages(self, stages, world: int) -> None:
        """Every curriculum stage can be fed: its training clips long enough for its frames fill a batch of
        every process, and a held-out clip is long enough too (checked at the start, not when the stage begins)."""
        cfg = self.cfg
        if cfg.data == "synthetic":
            return
        for i, stage in enumerate(stages):
            need = (stage.frames - 1) * cfg.frame_stride + 1
            usable = [sum(self.lengths.get(f, -1) >= need for f in files) for files in (self.train_files, self.eval_files)]
            where = (f"data: curriculum stage {i + 1} ({stage}) needs clips of {need} frames "
                     f"({stage.frames} frames, frame_stride {cfg.frame_stride})")
            if usable[0] < cfg.batch_size * world:
                raise DataError(f"{where}: {usable[0]} of {len(self.train_files)} training clips are that long, "
                                f"fewer than one batch of {cfg.batch_size} x {world} processes")
            if not usable[1]:
                raise DataError(f"{where}: none of the {len(self.eval_files)} held-out clips is that long")

    def datasets(self, frames: int, resolution: int) -> tuple[Dataset, Dataset]:
        cfg = self.cfg
        n_eval = cfg.eval_batches * cfg.batch_size
        if cfg.data == "synthetic":
            return (SyntheticVideo(cfg.num_samples, frames, resolution, cfg.channels, cfg.seed),
                    SyntheticVideo(n_eval, frames, resolution, cfg.channels, cfg.seed + 1_000_003))
        args = (frames, resolution, cfg.channels, cfg.frame_stride, cfg.seed)
        train = ClipFolder(self.train_files, *args, lengths=self.lengths)
        held = ClipFolder(self.eval_files, *args, lengths=self.lengths)
        return train, Subset(held, range(min(len(held), n_eval)))  # eval_batches bounds an evaluation


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` that starts its first epoch `start` samples in (to resume mid-epoch)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, start: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class DataStream:
    """Endless batches `(clips, indices)` of one rank, epoch after epoch, with a resumable position."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world: int, seed: int,
                 num_workers: int = 0, epoch: int = 0, batch: int = 0, pin_memory: bool = False) -> None:
        if len(dataset) < batch_size * world:
            raise DataError(f"data: {len(dataset)} clips cannot fill one batch of {batch_size} x {world} processes")
        self.batch_size, self.epoch, self.batch = batch_size, epoch, batch
        self.sampler = ResumableSampler(dataset, world, rank, seed, start=batch * batch_size)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True, num_workers=num_workers,
            worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory,
            persistent_workers=False,
        )
        self.batches_per_epoch = self.sampler.num_samples // batch_size
        self._iter = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iter is None:
            if self.batch >= self.batches_per_epoch:
                self.epoch, self.batch, self.sampler.start = self.epoch + 1, 0, 0
            self.sampler.set_epoch(self.epoch)
            self._iter = iter(self.loader)
        try:
            item = next(self._iter)
        except StopIteration:
            self._iter = None
            self.batch = self.batches_per_epoch
            return next(self)
        self.batch += 1
        return item

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}
