"""Benchmark harness: wrong contenders are reported and not timed, rounds interleave, the roofline
and reports are written, and `python -m wmkernels.bench --quick` runs end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wmkernels.bench import harness, report
from wmkernels.bench.__main__ import load_cases

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(rounds=4, warmup=1, min_sample_s=0.0, max_seconds=30.0)


def _double(d):
    return d["x"] * 2


def _tiny_case(**contenders) -> harness.Case:
    return harness.Case(op="toy", name="tiny", size=1000, setup=lambda: {"x": torch.randn(1000)},
                        contenders={"eager": _double, **contenders}, bytes_moved=8000, rtol=1e-5, atol=1e-6)


def test_wrong_contender_is_failed_and_not_timed():
    case = _tiny_case(good=lambda d: d["x"] + d["x"], wrong=lambda d: d["x"] * 2 + 1e-3,
                      misshaped=lambda d: (d["x"] * 2)[:-1], raises=lambda d: 1 / 0)
    res = harness.run_case(case, "cpu", quick=False, **FAST)
    cs = res["contenders"]
    assert cs["good"]["status"] == "ok" and cs["good"]["median_s"] > 0
    assert cs["eager"]["status"] == "ok" and cs["eager"]["rounds"] == 4
    assert cs["wrong"]["status"] == "FAILED" and "differ" in cs["wrong"]["error"]
    assert cs["misshaped"]["status"] == "FAILED" and "shape" in cs["misshaped"]["error"]
    assert cs["raises"]["status"] == "error" and "ZeroDivisionError" in cs["raises"]["error"]
    for name in ("wrong", "misshaped", "raises"):
        assert "median_s" not in cs[name]
    only_wrong = harness.run_case(_tiny_case(eager=lambda d: 1 / 0, x=lambda d: 1 / 0), "cpu", quick=False, **FAST)
    assert all(c["status"] == "error" for c in only_wrong["contenders"].values())  # nothing to time: no crash


def test_compare_checks_every_output_of_a_tuple():
    x = torch.ones(3)
    assert harness.compare((x, x * 2), (x, x * 2), 1e-6, 1e-6)[0]
    ok, why, _ = harness.compare((x, x * 2), (x, x * 3), 1e-6, 1e-6)
    assert not ok and why.startswith("output 1")
    assert not harness.compare((x,), (x, x), 1e-6, 1e-6)[0]


def test_rounds_are_interleaved_and_rotated():
    calls = []

    def recorder(name):
        def fn(d):
            calls.append(name)
            return d["x"] * 2
        return fn

    case = _tiny_case(a=recorder("a"), b=recorder("b"))
    case.contenders["eager"] = recorder("eager")
    harness.run_case(case, "cpu", quick=False, **FAST)
    timed = calls[-12:]  # 4 rounds x 3 contenders, one call per sample (min_sample_s=0)
    rounds = [timed[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["a", "b", "eager"] for r in rounds)
    assert len({r[0] for r in rounds}) == 3  # the starting contender rotates


def test_quick_mode_drops_compile_and_floor_is_reported():
    case = _tiny_case(compile=_double)
    case.floor = lambda d: d["x"].clone()
    assert "compile" not in harness.active_contenders(case, quick=True)
    res = harness.run_case(case, "cpu", quick=False, **FAST)
    harness.derive_metrics(res, {"copy_gbps": 10.0, "matmul_tflops": {"float32": 1.0}})
    eager = res["contenders"]["eager"]
    assert res["floor"]["median_s"] > 0
    assert eager["speedup_vs_eager"] == pytest.approx(1.0)
    assert eager["speedup_vs_compile"] == pytest.approx(res["contenders"]["compile"]["median_s"] / eager["median_s"])
    assert eager["gbps"] == pytest.approx(8000 / eager["median_s"] / 1e9)
    assert eager["bw_fraction"] == pytest.approx(eager["gbps"] / 10.0)
    assert eager["floor_fraction"] == pytest.approx(res["floor"]["median_s"] / eager["median_s"])


def test_failing_reference_leaves_the_others_timed_but_unchecked():
    def oom(d):
        raise RuntimeError("CUDA out of memory (simulated)")

    case = _tiny_case(fused=_double)
    case.contenders["eager"] = oom
    res = harness.run_case(case, "cpu", quick=False, **FAST)
    assert res["contenders"]["eager"]["status"] == "error" and "out of memory" in res["contenders"]["eager"]["error"]
    assert res["contenders"]["fused"]["status"] == "unchecked" and res["contenders"]["fused"]["median_s"] > 0


def test_missing_reference_is_a_case_error():
    case = _tiny_case()
    case.reference = "nope"
    assert harness.run_case(case, "cpu", quick=False, **FAST)["status"] == "error"


def test_cpu_peak_memory_sees_a_64mb_buffer():
    peak, method = harness.cpu_peak_extra_bytes(lambda d: torch.ones(16 << 20), {})
    assert 60 << 20 < peak < 100 << 20, (peak, method)


def test_dtype_filter_and_case_names_are_unique():
    cases = load_cases("mse", "cpu", True, {"bfloat16"})
    assert cases and all(harness.case_dtype(c) == "bfloat16" for c in cases)
    names = [c.name for c in load_cases("mse", "cpu", True, None)]
    assert len(names) == len(set(names))


def test_report_files_are_written(tmp_path):
    case = _tiny_case(wrong=lambda d: d["x"])
    res = harness.run_case(case, "cpu", quick=False, **FAST)
    res["allocator"] = "caching"
    roof = {"copy_gbps": 10.0, "matmul_tflops": {"float32": 1.0}}
    harness.derive_metrics(res, roof)
    payload = {"date": "today", "machine": {"device_name": "test cpu"},
               "config": {"command": "wmkernels-bench", "rounds": 4}, "primary_run": "caching",
               "runs": {"caching": {"roofline": roof, "allocator_desc": "test"}}, "cases": [res]}
    files = report.write_all(tmp_path, payload)
    assert json.loads((tmp_path / "results.json").read_text())["cases"][0]["name"] == "tiny"
    md = (tmp_path / "results.md").read_text()
    assert "## toy" in md and "**FAILED**" in md and "| tiny | eager |" in md
    assert set(files) >= {"results.json", "results.md"}


def test_plots_time_vs_size_and_memory_vs_batch(tmp_path):
    pytest.importorskip("matplotlib")
    roof = {"copy_gbps": 10.0, "matmul_tflops": {"float32": 1.0}}
    cases = []
    for b in (8, 16, 32):
        case = _tiny_case()
        case.name, case.size, case.params = f"B{b}", b * 100, {"B": b, "D": 4}
        res = harness.run_case(case, "cpu", quick=False, **FAST)
        res["allocator"] = "caching"
        res["contenders"]["eager"]["peak_extra_bytes"] = b << 20
        cases.append(harness.derive_metrics(res, roof))
    payload = {"primary_run": "caching", "runs": {"caching": {"roofline": roof}},
               "machine": {"device_name": "test cpu"}, "cases": cases}
    files = report.write_plots(tmp_path, payload)
    assert files == ["toy-D-4-time.png", "toy-D-4-memory.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in files)


def test_roofline_measures_copy_and_matmul():
    from wmkernels.bench import roofline

    assert roofline.copy_bandwidth("cpu", 8 << 20, repeats=2) > 0
    assert roofline.matmul_tflops("cpu", torch.float32, 64, repeats=2) > 0


def test_in_process_run_writes_partial_and_final_results(tmp_path, monkeypatch):
    from wmkernels.bench import __main__ as cli

    writes = []
    real_write = cli._write
    monkeypatch.setattr(cli, "_write", lambda *a, **k: (writes.append(k.get("quiet", False)), real_write(*a, **k)))
    monkeypatch.setattr(cli, "load_cases", lambda op, device, quick, dtypes, only=None: [_tiny_case(), _tiny_case(wrong=lambda d: -d["x"])])
    assert cli.main(["--op", "mse", "--device", "cpu", "--quick", "--in-process", "--out", str(tmp_path)]) == 1
    assert writes == [True, True, False]  # after each case (the GPU path), then the final write
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["primary_run"] == "in-process" and len(payload["cases"]) == 2
    assert payload["cases"][1]["contenders"]["wrong"]["status"] == "FAILED"


@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path):
    out = tmp_path / "res"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "wmkernels.bench", "--quick", "--op", "mse",
                           "--device", "cpu", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    assert payload["skipped_ops"] == {}
    assert payload["roofline"]["copy_gbps"] > 0
    cases = [c for c in payload["cases"] if c["op"] == "mse"]
    assert cases and all(c["status"] == "ok" for c in cases)
    for c in cases:
        assert "compile" not in c["contenders"]
        for name, r in c["contenders"].items():
            assert r["status"] == "ok" and r["median_s"] > 0 and r["peak_extra_bytes"] is not None, (c["name"], name)
    assert "wmkernels-cpu" in cases[0]["contenders"]
    assert "## mse" in (out / "results.md").read_text()
    assert list(out.glob("*.png"))


def test_compare_fails_zero_or_scaled_outputs_that_a_loose_atol_would_pass():
    grad = torch.randn(1000) * 1e-6  # gradients of O(1/B), far below the case's atol
    loose = dict(rtol=2e-2, atol=1e-5)
    assert harness.compare((torch.ones(()), grad * (1 + 1e-3)), (torch.ones(()), grad), **loose)[0]
    for wrong in (torch.zeros_like(grad), grad * 0.5):
        ok, why, _ = harness.compare((torch.ones(()), wrong), (torch.ones(()), grad), **loose)
        assert not ok and why.startswith("output 1: relative error")
    assert harness.compare(torch.zeros(3), torch.zeros(3), 1e-6, 1e-6)[0]  # an all-zero reference is fine


def test_contrastive_case_check_rejects_zero_gradients():
    from wmkernels.bench import contrastive

    (case,) = contrastive.cases("cpu", quick=True)
    torch.manual_seed(0)
    inputs = case.setup()
    ref = case.contenders["eager"](inputs)
    assert 0.5 < float(ref[0]) < 5  # a loss of a few nats: the softmax is not saturated
    zero_grads = (ref[0], torch.zeros_like(ref[1]), torch.zeros_like(ref[2]), ref[3])
    assert not harness.compare(zero_grads, ref, case.rtol, case.atol)[0]
    for name in harness.active_contenders(case, quick=True):
        ok, why, _ = harness.compare(case.contenders[name](inputs), ref, case.rtol, case.atol)
        assert ok, (name, why)


def test_contender_raising_while_timed_is_an_error_and_the_others_keep_their_times():
    calls = []

    def flaky(d):  # passes the check, then fails (out of memory on a later call)
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("out of memory (simulated)")
        return d["x"] * 2

    floor_calls = []

    def floor(d):  # the floor's first call is untimed, its second sizes its samples
        floor_calls.append(1)
        return 1 / 0 if len(floor_calls) > 2 else d["x"].clone()

    case = _tiny_case(flaky=flaky, good=_double)
    case.floor = floor
    res = harness.run_case(case, "cpu", quick=False, **FAST)
    cs = res["contenders"]
    assert res["status"] == "ok"
    assert cs["flaky"]["status"] == "error" and cs["flaky"]["error"].startswith("while timing: RuntimeError")
    assert "median_s" not in cs["flaky"]
    assert cs["good"]["median_s"] > 0 and cs["eager"]["rounds"] == 4
    assert "ZeroDivisionError" in res["floor_error"] and res["floor"] is None


def _summary_of(contenders: dict, **case) -> str:
    res = {"op": "toy", "name": "tiny", "status": "ok", "error": "", "reference": "eager", "floor": None,
           "contenders": contenders, **case}
    return "\n".join(report._summary([res]))


def test_summary_reports_failed_kernels_and_the_binding_roofline():
    ok = {"status": "ok", "median_s": 1e-3, "bw_fraction": 0.01, "flops_fraction": 0.5, "speedup_vs_eager": 2.0}
    assert "| 50% |" in _summary_of({"eager": dict(ok), "wmkernels-cpu": ok})  # compute-bound: the matmul peak
    failed = _summary_of({"eager": ok, "wmkernels-cpu": {"status": "FAILED", "error": "output 1 differs"}})
    assert "wmkernels-cpu FAILED" in failed
    assert "case error" in _summary_of({}, status="error", error="setup: boom")
    train = _summary_of({"bare-loop": ok, "wmkernels-train": {**ok, "speedup_vs_eager": None,
                                                              "speedup_vs_reference": 0.97}}, reference="bare-loop")
    assert "0.97x vs bare-loop" in train
    unchecked = _summary_of({"eager": {"status": "error", "error": "out of memory"},
                             "wmkernels-cpu": {**ok, "status": "unchecked"}})
    assert "**unchecked**" in unchecked


def test_results_over_a_roofline_are_explained():
    """A cache-resident case beats the DRAM copy bandwidth (200% was reported bare): the header says why."""
    def header(fraction):
        res = {"op": "toy", "name": "tiny", "contenders": {"wmkernels-cpu": {"bw_fraction": fraction}}}
        roof = {"copy_gbps": 10.0, "copy_bytes": 256 << 20, "matmul_tflops": {}}
        payload = {"date": "today", "machine": {}, "config": {"rounds": 4}, "roofline": roof,
                   "runs": {"caching": {"roofline": roof, "allocator_desc": "test"}}, "cases": [res]}
        return "\n".join(report._machine_lines(payload))

    assert "1 contender result(s) exceed 100% of a roofline" in header(2.0)
    assert "larger than the caches (256 MiB)" in header(2.0)
    assert "exceed" not in header(0.9)


@pytest.mark.parametrize("argv,message", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--only", "("], "is not a regular expression"),
    (["--op", "mse,foo"], "--op: unknown op 'foo' (known: mse, masked, contrastive, train)"),  # once ran mse, exit 0
    (["--op", ","], "--op: unknown op"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    from wmkernels.bench.__main__ import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_device_cuda_without_cuda_is_a_clear_usage_error(capsys):
    from wmkernels.bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda", "--quick"])
    assert exc.value.code == 2 and "sees no CUDA device" in capsys.readouterr().err


def test_a_run_that_selects_no_case_fails(tmp_path, monkeypatch):
    from wmkernels.bench import __main__ as cli, roofline

    monkeypatch.setattr(roofline, "measure", lambda device, quick: {"copy_gbps": 1.0, "matmul_tflops": {"float32": 1.0}})
    argv = ["--op", "mse", "--device", "cpu", "--quick", "--in-process", "--out", str(tmp_path)]
    assert cli.main(argv + ["--only", "no-such-case"]) == 1
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exc:  # refused before any timing, not with a traceback after it
        cli.main([*argv[:-1], str(tmp_path / "a-file" / "out")])
    assert exc.value.code == 2


def test_contrastive_contenders_return_gradients_in_the_input_dtype():
    from wmkernels.bench import contrastive

    case = contrastive._case("cpu", 64, 32, torch.bfloat16)  # an fp32 copy would count in time and memory
    inputs = case.setup()
    for name in harness.active_contenders(case, quick=True):
        _, dz1, dz2, _ = case.contenders[name](inputs)
        assert dz1.dtype == dz2.dtype == torch.bfloat16, name


def test_train_case_inputs_remove_their_log_folder():
    from wmkernels.bench import train

    inputs = train.cases("cpu", quick=True)[0].setup()
    out_dir = Path(inputs["cfg"].out_dir)
    assert out_dir.is_dir()
    del inputs
    assert not out_dir.exists()  # every benchmark run used to leave one per setup() in /tmp
