"""pytest-benchmark over the MSE cases of `wmkernels/bench/mse.py` (the cases `wmkernels-bench --op mse`
times in interleaved rounds): `pytest benchmarks/bench_mse.py`. Quick shapes by default; set
WMKERNELS_BENCH_FULL=1 for issue 2's shapes (16M elements, next-frame 8x16x3x128x128) and the sweep,
WMKERNELS_BENCH_DEVICE=cpu|cuda to pick the device. Every contender is checked equal to eager first."""
import os

import pytest
import torch

from wmkernels.bench import harness, mse

DEVICE = os.environ.get("WMKERNELS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("WMKERNELS_BENCH_FULL", "0") != "1"
CASES = mse.cases(DEVICE, QUICK)
PARAMS = [pytest.param(c, n, id=f"{c.name}-{n}") for c in CASES for n in [*harness.active_contenders(c, QUICK), "floor"]]
_inputs: dict = {}


def _case_inputs(case: harness.Case):
    """Inputs and reference output of one case, kept while its contenders run (one case at a time)."""
    if case.name not in _inputs:
        _inputs.clear()
        harness.allow_recompiles()
        torch.manual_seed(0)
        inputs = case.setup()
        _inputs[case.name] = (inputs, case.contenders[case.reference](inputs))
    return _inputs[case.name]


@pytest.mark.parametrize("case,contender", PARAMS)
def test_mse(benchmark, case, contender):
    inputs, ref = _case_inputs(case)
    if contender == "floor":
        fn = case.floor
    else:
        fn = case.contenders[contender]
        ok, why, _ = harness.compare(fn(inputs), ref, case.rtol, case.atol)
        assert ok, f"{contender} differs from {case.reference}: {why}"
    benchmark.group = case.name
    benchmark.extra_info.update(size=case.size, bytes_moved=case.bytes_moved, device=DEVICE)

    def call():
        fn(inputs)
        harness.sync(DEVICE)

    benchmark.pedantic(call, rounds=5 if QUICK else 15, warmup_rounds=2, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = case.bytes_moved / benchmark.stats.stats.median / 1e9
