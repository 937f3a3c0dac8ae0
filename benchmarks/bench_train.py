"""pytest-benchmark over the training-driver cases of `wmkernels/bench/train.py` (what
`wmkernels-bench --op train` times in interleaved rounds): `pytest benchmarks/bench_train.py`.
Steps/s of `wmkernels-train`'s loop vs a bare loop doing the same math; quick shapes by default,
WMKERNELS_BENCH_FULL=1 for every objective at 32 px x 8 frames. Both are checked to end with the
same parameters before timing; the driver's overhead is `wmkernels-train / bare-loop - 1` (target <= 5%)."""
import pytest

from _cases import DEVICE, QUICK, CaseInputs, check, params, run
from wmkernels.bench import train

CASES = train.cases(DEVICE, QUICK)
PARAMS = params(CASES, lambda c: c.contenders)
_case_inputs = CaseInputs(seed=None, recompiles=False)


@pytest.mark.parametrize("case,contender", PARAMS)
def test_train(benchmark, case, contender):
    inputs, ref = _case_inputs(case)
    fn = check(case, contender, inputs, ref)
    median = run(benchmark, case, fn, inputs, rounds=3 if QUICK else 7, warmup_rounds=1, **case.params)
    if median is not None:  # None under --benchmark-disable
        benchmark.extra_info["steps_per_s"] = case.params["steps"] / median
