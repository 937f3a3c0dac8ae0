"""pytest-benchmark over the MSE cases of `wmkernels/bench/mse.py` (the cases `wmkernels-bench --op mse`
times in interleaved rounds): `pytest benchmarks/bench_mse.py`. Quick shapes by default; set
WMKERNELS_BENCH_FULL=1 for issue 2's shapes (16M elements, next-frame 8x16x3x128x128) and the sweep,
WMKERNELS_BENCH_DEVICE=cpu|cuda to pick the device. Every contender is checked equal to eager first."""
import pytest

from _cases import DEVICE, QUICK, CaseInputs, check, params, run
from wmkernels.bench import harness, mse

CASES = mse.cases(DEVICE, QUICK)
PARAMS = params(CASES, lambda c: [*harness.active_contenders(c, QUICK), "floor"])
_case_inputs = CaseInputs()


@pytest.mark.parametrize("case,contender", PARAMS)
def test_mse(benchmark, case, contender):
    inputs, ref = _case_inputs(case)
    fn = case.floor if contender == "floor" else check(case, contender, inputs, ref)
    median = run(benchmark, case, fn, inputs, rounds=5 if QUICK else 15, warmup_rounds=2,
                 size=case.size, bytes_moved=case.bytes_moved)
    if median is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = case.bytes_moved / median / 1e9
