"""The training driver: config, data, the four objectives, precision, resume, checkpoints, policies."""
import json
import os

import numpy as np
import pytest
import torch

from wmkernels.train import ConfigError, Stage, Trainer, TrainingStopped, make_config, parse_args
from wmkernels.train import checkpoint as ckpt_io
from wmkernels.train.__main__ import main
from wmkernels.train.config import build_parser
from wmkernels.train.data import ClipFolder, DataError, DataSource, DataStream, SyntheticVideo, _read_clip, list_clips
from wmkernels.train.loop import param_groups, warmup_cosine
from wmkernels.train.models import set_grad_checkpointing
from wmkernels.train.objectives import build_objective

# Small and fast: 16 px, 4 frames, a few steps; the reference loss backend keeps runs independent
# of the compiled extension (the loss ops have their own tests on every backend).
SMALL = dict(
    curriculum=[Stage(16, 4, 20)], batch_size=4, num_samples=64, lr=2e-3, warmup_steps=2, threads=1,
    progress=False, tensorboard=False, log_every=2, eval_every=0, sample_every=0, ckpt_every=0, eval_batches=1,
    loss_backend="torch", embed_dim=32, num_heads=2, decoder_dim=16, conv_width=8, proj_dim=16,
)


def config(tmp_path, **overrides):
    return make_config({**SMALL, "out_dir": str(tmp_path), **overrides})


def train(tmp_path, **overrides):
    trainer = Trainer(config(tmp_path, **overrides))
    return trainer, trainer.run()


# ---- config ----

def test_presets_file_and_cli_precedence(tmp_path):
    assert make_config().preset == "tiny" and make_config().objective == "masked"
    assert make_config(preset="small").embed_dim == 192
    path = tmp_path / "run.yaml"
    path.write_text("objective: next-frame\nlr: 0.002\ncurriculum:\n  - {resolution: 32, frames: 4, steps: 7}\n")
    cfg = parse_args(["--config", str(path), "--lr", "0.003", "--no-progress"])
    assert cfg.objective == "next-frame" and cfg.lr == 0.003 and cfg.progress is False
    assert cfg.curriculum == [Stage(32, 4, 7)]
    (tmp_path / "run.json").write_text(json.dumps({"batch-size": 3, "curriculum": "16x2x5,32x4x5"}))
    cfg = make_config(file=str(tmp_path / "run.json"))
    assert cfg.batch_size == 3 and cfg.curriculum == [Stage(16, 2, 5), Stage(32, 4, 5)]


def test_steps_rescale_curriculum():
    cfg = make_config({"curriculum": "16x4x100,32x4x60,32x8x40", "steps": 20})
    assert [s.steps for s in cfg.stages()] == [10, 6, 4] and cfg.total_steps() == 20
    cfg = make_config({"curriculum": "16x4x5,32x4x5,32x8x1", "steps": 4})  # rounding never drops a stage
    assert [s.steps for s in cfg.stages()] == [2, 1, 1]


@pytest.mark.parametrize("argv, option", [
    (["--lr", "-1"], "lr"),
    (["--mask-ratio", "1.0"], "mask_ratio"),
    (["--curriculum", "30x4x10"], "curriculum"),
    (["--objective", "jepa"], "objective"),
    (["--precision", "fp8"], "precision"),
    (["--curriculum", "32x3x10"], "curriculum"),
    (["--batch-size", "0"], "batch_size"),
    (["--batch-size", "two"], "batch_size"),
    (["--mask-ratio", "0.01"], "mask_ratio"),  # masks no patch: nothing to predict
    (["--temperature", "inf"], "temperature"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--mlp-ratio", "0.001"], "mlp_ratio"),  # no MLP hidden unit
    (["--seed", "-1"], "seed"),
    (["--out-dir", ""], "out_dir"),
])
def test_bad_config_names_the_option(argv, option, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err
    assert f"{option}:" in err or f"--{option.replace('_', '-')}:" in err, err


def test_bad_config_api_and_file(tmp_path):
    with pytest.raises(ConfigError, match="^lr:"):
        make_config({"lr": 0})
    with pytest.raises(ConfigError, match="^learning_rate: unknown option"):
        make_config({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="config: file"):
        make_config(file=str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="^curriculum: stage 1 resolution: expected int, got 'a'"):
        make_config({"curriculum": [{"resolution": "a", "frames": 4, "steps": 3}]})
    with pytest.raises(ConfigError, match="^batch_size: expected int, got True"):
        make_config({"batch_size": True})


def test_config_file_syntax_errors_and_objective_specific_checks(tmp_path):
    (tmp_path / "bad.yaml").write_text(": : :\n")
    with pytest.raises(ConfigError, match="^config: .*bad.yaml' is not valid YAML"):
        make_config(file=str(tmp_path / "bad.yaml"))
    (tmp_path / "bad.json").write_text("{batch_size: 2")
    with pytest.raises(ConfigError, match="^config: .*bad.json' is not valid JSON"):
        make_config(file=str(tmp_path / "bad.json"))
    # one value per patch has no per-patch std: refused up front, not at the first step
    tiny_patch = {"tubelet": 1, "channels": 1, "patch_size": 1, "curriculum": "4x2x5", "mask_ratio": 0.5}
    with pytest.raises(ConfigError, match="^norm_pix: .* = 1; use --no-norm-pix"):
        make_config(tiny_patch)
    assert make_config({**tiny_patch, "norm_pix": False}).patch_size == 1
    # only the masked objective has a decoder: its width is checked there alone
    for objective in ("contrastive", "next-frame"):
        assert make_config({"objective": objective, "embed_dim": 48, "num_heads": 3}).decoder_dim == 32
    with pytest.raises(ConfigError, match="^decoder_dim: expected a multiple of num_heads=3"):
        make_config({"objective": "masked", "embed_dim": 48, "num_heads": 3})


def test_run_setup_errors_name_the_problem(tmp_path):
    """Caught when the trainer is built, before any step: each a ConfigError / CheckpointError naming it."""
    with pytest.raises(ConfigError, match="^loss_backend: 'cuda' cannot run the losses on cpu"):
        Trainer(config(tmp_path / "a", loss_backend="cuda"))
    with pytest.raises(ConfigError, match="^batch_size: the contrastive objective needs other clips"):
        Trainer(config(tmp_path / "b", objective="contrastive", batch_size=1))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="^out_dir: cannot create folder"):
        Trainer(config(tmp_path / "file"))
    with pytest.raises(DataError, match="is a file, not a folder"):
        Trainer(config(tmp_path / "c", data=str(tmp_path / "file")))
    # a fresh run over another run's checkpoints would mix files (and rotate the new ones out first)
    train(tmp_path / "d", curriculum=[Stage(16, 4, 2)], ckpt_every=1)
    with pytest.raises(ConfigError, match="^out_dir: .* holds checkpoints of an earlier run .*--resume auto"):
        Trainer(config(tmp_path / "d", curriculum=[Stage(16, 4, 2)]))
    # --resume with a folder: its latest checkpoint; with a file that is not a run's checkpoint: refused
    assert Trainer(config(tmp_path / "e", curriculum=[Stage(16, 4, 2)], resume=str(tmp_path / "d"))).step == 2
    with pytest.raises(ckpt_io.CheckpointError, match="folder .* holds no checkpoint"):
        Trainer(config(tmp_path / "f", resume=str(tmp_path / "c")))
    torch.save(build_objective(config(tmp_path)).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="not a checkpoint written by wmkernels-train .*bare model"):
        Trainer(config(tmp_path / "g", resume=str(tmp_path / "weights.pt")))


def test_help_documents_every_option():
    text = build_parser().format_help()
    for flag in ("--objective", "--precision", "--grad-checkpointing", "--compile", "--resume", "--curriculum",
                 "--wandb", "--mask-ratio", "--grad-accum", "--max-nonfinite", "--keep-last", "--data"):
        assert flag in text


# ---- data ----

def test_synthetic_video_deterministic():
    a, b = SyntheticVideo(8, 4, 16, seed=3), SyntheticVideo(8, 4, 16, seed=3)
    clip, index = a[5]
    assert clip.shape == (4, 3, 16, 16) and clip.dtype == torch.float32 and index == 5
    assert torch.equal(clip, b[5][0])
    assert not torch.equal(clip, a[6][0]) and not torch.equal(clip, SyntheticVideo(8, 4, 16, seed=4)[5][0])
    assert 0 <= clip.min() and clip.max() <= 1
    assert (clip[1:] - clip[:-1]).abs().sum() > 0  # things move


def test_stream_shards_and_resumes():
    ds = SyntheticVideo(12, 2, 8)
    one = DataStream(ds, 2, 0, 1, seed=1)
    full = next(one)[1].tolist() + next(one)[1].tolist()
    s0, s1 = DataStream(ds, 1, 0, 2, seed=1), DataStream(ds, 1, 1, 2, seed=1)
    shards = [next(s0)[1].item(), next(s1)[1].item(), next(s0)[1].item(), next(s1)[1].item()]
    assert sorted(full) == sorted(shards)
    stream = DataStream(ds, 4, 0, 1, seed=1)
    seen = [next(stream)[1].tolist() for _ in range(5)]  # crosses an epoch (3 batches per epoch)
    pos = stream.state()
    resumed = DataStream(ds, 4, 0, 1, seed=1, **{"epoch": 0, "batch": 1})
    assert [next(resumed)[1].tolist() for _ in range(4)] == seen[1:]
    assert pos == {"epoch": 1, "batch": 2}


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_clips(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no .mp4 or .npy"):
        list_clips(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        Trainer(config(tmp_path / "run", data=str(tmp_path / "nope")))


def test_npy_folder_skips_bad_clips(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(tmp_path / f"clip{i}.npy", rng.integers(0, 255, (10, 20, 24, 3), dtype=np.uint8))
    np.save(tmp_path / "short.npy", rng.random((2, 20, 24, 3), dtype=np.float32))
    (tmp_path / "broken.npy").write_bytes(b"not a numpy file")
    files = list_clips(str(tmp_path))
    ds = ClipFolder(files, frames=4, resolution=16, frame_stride=2)
    assert len(ds) == 4 and ds.skipped == 2
    assert "skipped 2 of 6 clips (1 unreadable, 1 shorter than 7 frames)" in caplog.text
    clip, _ = ds[1]
    assert clip.shape == (4, 3, 16, 16) and 0 <= clip.min() and clip.max() <= 1
    assert _read_clip(str(tmp_path / "clip0.npy"), 0, 2, 1).flags.writeable  # torch warns on a read-only (memory-mapped) array
    with pytest.raises(DataError, match="none of 6 clips is usable"):
        ClipFolder(files, frames=20, resolution=16)
    cfg = config(tmp_path / "run", data=str(tmp_path), curriculum=[Stage(16, 4, 2)], batch_size=1)
    train_set, held = DataSource(cfg).datasets(4, 16)
    assert len(train_set) + len(held) == 4
    _, out = train(tmp_path / "run", data=str(tmp_path), curriculum=[Stage(16, 4, 2)], batch_size=1, frame_stride=2)
    assert out["step"] == 2 and np.isfinite(out["eval"]["loss"])


def test_clips_too_short_for_a_later_stage_fail_at_the_start(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        np.save(tmp_path / f"clip{i:02d}.npy", rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8))
    curriculum = [Stage(16, 4, 2), Stage(16, 8, 2)]  # 6 frames feed the first stage, not the second
    with pytest.raises(DataError, match=r"^data: curriculum stage 2 \(16x8x2\) needs clips of 8 frames .*: 0 of"):
        Trainer(config(tmp_path / "run", data=str(tmp_path), curriculum=curriculum))
    with pytest.raises(DataError, match="stage 1 .* needs clips of 7 frames .*frame_stride 2"):
        Trainer(config(tmp_path / "run", data=str(tmp_path), curriculum=curriculum[:1], frame_stride=2))
    assert Trainer(config(tmp_path / "run", data=str(tmp_path), curriculum=curriculum[:1])).step == 0


def test_clips_of_other_channels_name_the_clip(tmp_path):
    np.save(tmp_path / "clip.npy", np.zeros((4, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"cannot turn 3-channel frames into channels=2 \(.*clip.npy\)"):
        ClipFolder([str(tmp_path / "clip.npy")], 4, 16, channels=2)[0]


def test_folder_evaluation_bounded_by_eval_batches(tmp_path):
    for i in range(12):
        np.save(tmp_path / f"clip{i:02d}.npy", np.zeros((4, 16, 16, 3), dtype=np.uint8))
    cfg = config(tmp_path / "run", data=str(tmp_path), eval_fraction=0.5, batch_size=2, eval_batches=1)
    _, held = DataSource(cfg).datasets(4, 16)
    assert len(held) == 2


def test_mp4_folder(tmp_path):
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "a.mp4"), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(12):
            img = np.full((24, 32, 3), i * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    ds = ClipFolder(list_clips(str(tmp_path)), frames=4, resolution=16, frame_stride=2)
    clip, _ = ds[0]
    assert clip.shape == (4, 3, 16, 16)
    assert (clip[1:].mean((1, 2, 3)) > clip[:-1].mean((1, 2, 3))).all()  # frames brighten over time


# ---- objectives and optimization ----

@pytest.mark.parametrize("objective", ["masked", "next-frame", "reconstruction", "contrastive"])
def test_objective_loss_falls(tmp_path, objective):
    _, out = train(tmp_path, objective=objective)
    losses = [h["loss"] for h in out["history"]]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:2]), losses
    assert set(out["eval"]) == ({"loss", "accuracy"} if objective == "contrastive" else {"loss", "psnr"})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs(tmp_path, precision):
    _, out = train(tmp_path, precision=precision, curriculum=[Stage(16, 4, 4)])
    assert all(np.isfinite(h["loss"]) for h in out["history"])
    assert ("scaler_scale" in out["history"][-1]) == (precision == "fp16")
    assert out["nonfinite_skipped"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU training path needs a GPU")
@pytest.mark.parametrize("objective", ["masked", "next-frame", "reconstruction", "contrastive"])
def test_triton_gpu_training_steps(tmp_path, objective):
    """On a GPU, the default loss backend (Triton) under bf16 autocast with gradient checkpointing:
    the loss falls, nothing is skipped as non-finite, and a resumed run repeats the losses (the
    kernels are deterministic at these sizes: no timed tile picks, no repeated gather ids)."""
    common = dict(objective=objective, loss_backend="auto", device="cuda", precision="bf16", grad_checkpointing=True,
                  curriculum=[Stage(16, 4, 20)], log_every=2, ckpt_every=10, keep_last=5)
    trainer, out = train(tmp_path / "full", **common)
    assert trainer.device.type == "cuda"
    losses = [h["loss"] for h in out["history"]]
    assert all(np.isfinite(losses)) and out["nonfinite_skipped"] == 0
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:2]), losses
    _, res = train(tmp_path / "res", resume=str(tmp_path / "full" / "ckpt_00000010.pt"), **common)
    assert [h["loss"] for h in res["history"]] == losses[5:]


def test_grad_accumulation_and_checkpointing_same_step(tmp_path):
    """2 micro-batches of 2 with grad checkpointing == 1 batch of 4 without (same samples, same math)."""
    a, out_a = train(tmp_path / "a", curriculum=[Stage(16, 4, 3)], batch_size=4, log_every=1)
    b, out_b = train(tmp_path / "b", curriculum=[Stage(16, 4, 3)], batch_size=2, grad_accum=2, log_every=1,
                     grad_checkpointing=True)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in out_b["history"]], [h[key] for h in out_a["history"]], rtol=1e-4)


def test_grad_checkpointing_same_gradients():
    cfg = make_config({**SMALL, "objective": "reconstruction"})
    video = torch.rand(2, 4, 3, 16, 16)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        objective = build_objective(cfg)
        set_grad_checkpointing(objective, enabled)
        objective(video, [0, 1], 0).backward()
        grads.append([p.grad for p in objective.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


def test_param_groups_and_schedule():
    cfg = make_config({**SMALL, "objective": "masked"})
    groups = param_groups(build_objective(cfg), 0.05)
    objective = build_objective(cfg)
    names = {id(p): n for n, p in objective.named_parameters()}
    no_decay = {names[id(p)] for p in param_groups(objective, 0.05)[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {"model.mask_token", "model.pos.pos_embed_t", "model.patch_embed.bias", "model.encoder.norm.weight"} <= no_decay
    assert "model.patch_embed.weight" not in no_decay
    f = warmup_cosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_nonfinite_policy_stops_with_good_checkpoint(tmp_path):
    trainer = Trainer(config(tmp_path, max_nonfinite=3))
    initial = {k: v.clone() for k, v in trainer.objective.state_dict().items()}
    forward = trainer.runner.forward
    trainer.runner.forward = lambda *a: forward(*a) * float("nan")
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        trainer.run()
    state = ckpt_io.load(ckpt_io.CheckpointManager(str(tmp_path)).latest())
    assert state["step"] == 3 and state["counters"]["nonfinite_skipped"] == 3
    for k, v in state["model"].items():
        assert torch.equal(v, initial[k]), k


# ---- checkpoints and resume ----

def test_resume_is_bitwise_identical(tmp_path):
    """Interrupted at step 5 (mid-epoch, before a stage change and an epoch boundary) and resumed
    in a fresh trainer: the same parameters, optimizer state and losses as the uninterrupted run."""
    common = dict(curriculum=[Stage(16, 4, 7), Stage(16, 8, 5)], num_samples=24, ckpt_every=5, log_every=1,
                  keep_last=5)
    full, out_full = train(tmp_path / "full", **common)
    resumed, out_res = train(tmp_path / "res", resume=str(tmp_path / "full" / "ckpt_00000005.pt"), **common)
    assert out_res["step"] == out_full["step"] == 12
    assert [h["loss"] for h in out_res["history"]] == [h["loss"] for h in out_full["history"]][5:]
    for k, v in full.objective.state_dict().items():
        assert torch.equal(v, resumed.objective.state_dict()[k]), k
    for a, b in zip(full.optimizer.state.values(), resumed.optimizer.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_resume_auto_and_config_mismatch(tmp_path):
    train(tmp_path, curriculum=[Stage(16, 4, 3)])
    trainer = Trainer(config(tmp_path, curriculum=[Stage(16, 4, 3)], resume="auto"))
    assert trainer.step == 3
    with pytest.raises(ckpt_io.CheckpointError, match="embed_dim=32 in the checkpoint, 64 now"):
        Trainer(config(tmp_path, resume="auto", embed_dim=64))
    with pytest.raises(ckpt_io.CheckpointError, match="not found"):
        Trainer(config(tmp_path, resume=str(tmp_path / "nope.pt")))
    assert Trainer(config(tmp_path / "empty", resume="auto")).step == 0


def test_resume_between_logs_same_metrics(tmp_path):
    """The metrics window and the run of non-finite steps are part of the checkpoint."""
    common = dict(curriculum=[Stage(16, 4, 4)], log_every=2, ckpt_every=3)
    _, full = train(tmp_path / "full", **common)
    _, resumed = train(tmp_path / "res", resume=str(tmp_path / "full" / "ckpt_00000003.pt"), **common)
    assert resumed["history"][0]["loss"] == full["history"][1]["loss"]  # step 4: the mean over steps 3 and 4
    with pytest.raises(TrainingStopped):
        run_nan(tmp_path / "nan", max_nonfinite=3, ckpt_every=2)
    with pytest.raises(TrainingStopped, match="stopped at step 3"):
        run_nan(tmp_path / "nan", max_nonfinite=3, ckpt_every=2, resume=str(tmp_path / "nan" / "ckpt_00000002.pt"))


def test_all_nonfinite_window_logs_nan_not_zero(tmp_path):
    with pytest.raises(TrainingStopped):
        run_nan(tmp_path, max_nonfinite=5, log_every=2)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isnan(r["loss"]) for r in rows)


def test_metrics_of_a_resumed_run_hold_each_step_once(tmp_path):
    """The interrupted run logged steps past its last checkpoint: the resumed run logs them again, once."""
    common = dict(curriculum=[Stage(16, 4, 6)], log_every=1, ckpt_every=2)
    train(tmp_path, **common)
    ckpt_io.CheckpointManager(str(tmp_path)).save(ckpt_io.load(str(tmp_path / "ckpt_00000004.pt")), 4)  # "killed" at 5
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "tr')  # and torn mid-line
    train(tmp_path, resume="auto", **common)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    _, out = train(tmp_path / "fresh", **common)
    assert len(open(tmp_path / "fresh" / "metrics.jsonl").readlines()) == len(out["history"]) + 1  # + final eval


def run_nan(out_dir, **overrides):
    trainer = Trainer(config(out_dir, **overrides))
    forward = trainer.runner.forward
    trainer.runner.forward = lambda *a: forward(*a) * float("nan")
    return trainer.run()


def test_resume_at_the_end_and_with_new_optimizer_options(tmp_path, caplog):
    train(tmp_path, curriculum=[Stage(16, 4, 3)])
    _, out = train(tmp_path, curriculum=[Stage(16, 4, 3)], resume="auto")  # nothing left to train
    assert out["step"] == 3 and np.isfinite(out["eval"]["loss"]) and out["checkpoint"].endswith("ckpt_00000003.pt")
    trainer = Trainer(config(tmp_path, curriculum=[Stage(16, 4, 6)], resume="auto", lr=5e-3, beta1=0.5,
                             weight_decay=0.2, log_every=7))
    assert "lr 0.002 -> 0.005; beta1 0.9 -> 0.5; weight_decay 0.05 -> 0.2; curriculum" in caplog.text
    assert "log_every" not in caplog.text
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["betas"] == no_decay["betas"] == (0.5, 0.95) and (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0)
    assert decay["lr"] == no_decay["lr"] == 5e-3 * warmup_cosine(2, 6, 0.0)(3)  # the new schedule at step 3


def test_rotation_keeps_the_new_checkpoint(tmp_path):
    """Rewound to an earlier checkpoint, the run's new files survive a higher-numbered one left behind."""
    manager = ckpt_io.CheckpointManager(str(tmp_path), keep_last=1)
    manager.save({"step": 6}, 6)
    manager.save({"step": 4}, 4)
    assert manager.latest() == manager.path(4) and manager.checkpoints() == [manager.path(4)]


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    manager = ckpt_io.CheckpointManager(str(tmp_path), keep_last=2)
    manager.save({"step": 1, "w": torch.ones(3)}, 1)

    def killed(obj, f):
        f.write(b"partial checkpoint bytes")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save({"step": 2, "w": torch.zeros(3)}, 2)
    monkeypatch.undo()
    assert manager.latest() == manager.path(1)
    assert torch.equal(ckpt_io.load(manager.latest())["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000001.pt", "latest"]
    for step in (2, 3, 4):
        manager.save({"step": step}, step)
    assert [os.path.basename(p) for p in manager.checkpoints()] == ["ckpt_00000003.pt", "ckpt_00000004.pt"]


# ---- the command line ----

def test_main_writes_checkpoint_metrics_and_sample(tmp_path, caplog):
    # The default loss backend: wmkernels' compiled kernels where this install has them.
    argv = ["--out-dir", str(tmp_path), "--curriculum", "16x4x4,32x4x2", "--batch-size", "2", "--eval-every", "3",
            "--sample-every", "3", "--ckpt-every", "3", "--log-every", "2", "--embed-dim", "32", "--num-heads", "2",
            "--decoder-dim", "16"]
    caplog.set_level("INFO", logger="wmkernels.train")
    assert main(argv) == 0
    assert "done: 6 steps, loss " in caplog.text
    files = sorted(os.listdir(tmp_path))
    assert {"ckpt_00000003.pt", "ckpt_00000006.pt", "latest", "metrics.jsonl", "samples", "tb"} <= set(files)
    assert sorted(os.listdir(tmp_path / "samples")) == ["sample_00000003.gif", "sample_00000006.gif"]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "data_time_share", "peak_memory_mb"} <= set(train_rows[0])
    assert [r["step"] for r in rows if r["split"] == "eval"] == [3, 6]
    assert main([*argv, "--resume", "auto"]) == 0  # nothing left to train: evaluates and saves again
    assert "done: 6 steps; held-out loss" in caplog.text
    assert main(["--out-dir", str(tmp_path / "x"), "--data", str(tmp_path / "missing")]) == 2
    assert main(argv) == 2  # a fresh run over this run's checkpoints
    if not torch.cuda.is_available():
        assert main(["--out-dir", str(tmp_path / "y"), "--device", "cuda"]) == 2


def test_wandb_missing_is_a_clear_message(tmp_path, caplog, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    _, out = train(tmp_path, wandb=True, curriculum=[Stage(16, 4, 2)])
    assert out["step"] == 2
    assert "--wandb given but wandb is not installed (pip install wandb)" in caplog.text


def test_base_install_without_train_extra_runs(tmp_path, caplog, monkeypatch):
    """`pip install wmkernels` without [train] has no tqdm or Pillow: the run goes on without a
    progress bar and sample GIFs (a warning each, once), it does not crash at its last sample."""
    import builtins

    from wmkernels.train import monitor

    real_import = builtins.__import__

    def without_extra(name, *args, **kwargs):
        if name.split(".")[0] in ("tqdm", "PIL") or name == "torch.utils.tensorboard":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_extra)
    monitor._pil_image.cache_clear()
    monitor._summary_writer.cache_clear()
    try:
        for run in range(2):  # a second run in the process (the benchmark's cases) warns no more
            trainer, out = train(tmp_path / str(run), progress=True, tensorboard=True, sample_every=1,
                                 curriculum=[Stage(16, 4, 2)])
    finally:
        monitor._pil_image.cache_clear()
        monitor._summary_writer.cache_clear()
    assert out["step"] == 2 and trainer.last_sample is None and trainer.monitor.tb is None
    assert caplog.text.count("progress bar skipped: pip install tqdm") == 2  # one per run: each shows its bar
    assert caplog.text.count("sample GIFs skipped: pip install pillow") == 1
    assert caplog.text.count("TensorBoard logging skipped: pip install tensorboard") == 1


def test_stream_with_workers_same_batches():
    ds = SyntheticVideo(16, 2, 8)
    plain, workers = DataStream(ds, 4, 0, 1, seed=2), DataStream(ds, 4, 0, 1, seed=2, num_workers=2)
    for _ in range(5):  # crosses an epoch
        (a, ia), (b, ib) = next(plain), next(workers)
        assert torch.equal(ia, ib) and torch.equal(a, b)
