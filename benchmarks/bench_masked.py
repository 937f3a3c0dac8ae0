"""pytest-benchmark over the masked video modeling cases of `wmkernels/bench/masked.py` (the cases
`wmkernels-bench --op masked` times in interleaved rounds): `pytest benchmarks/bench_masked.py`.
Quick shapes by default; WMKERNELS_BENCH_FULL=1 for issue 3's shapes (B=2, C=3, T=16, 224x224,
tubelet 2x16x16, tube mask 0.9, fp32 and bf16), WMKERNELS_BENCH_DEVICE=cpu|cuda to pick the device.
Every contender is checked equal to eager first."""
import pytest

from _cases import DEVICE, QUICK, CaseInputs, check, params, run
from wmkernels.bench import masked

CASES = masked.cases(DEVICE, QUICK)
PARAMS = params(CASES)
_case_inputs = CaseInputs(seed=None)


@pytest.mark.parametrize("case,contender", PARAMS)
def test_masked(benchmark, case, contender):
    inputs, ref = _case_inputs(case)
    fn = check(case, contender, inputs, ref)
    median = run(benchmark, case, fn, inputs, rounds=5 if QUICK else 15, warmup_rounds=2,
                 size=case.size, bytes_moved=case.bytes_moved)
    if median is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = case.bytes_moved / median / 1e9
