"""pytest-benchmark over the training-driver cases of `wmkernels/bench/train.py` (what
`wmkernels-bench --op train` times in interleaved rounds): `pytest benchmarks/bench_train.py`.
Steps/s of `wmkernels-train`'s loop vs a bare loop doing the same math; quick shapes by default,
WMKERNELS_BENCH_FULL=1 for every objective at 32 px x 8 frames. Both are checked to end with the
same parameters before timing; the driver's overhead is `wmkernels-train / bare-loop - 1` (target <= 5%)."""
import os

import pytest
import torch

from wmkernels.bench import harness, train

DEVICE = os.environ.get("WMKERNELS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("WMKERNELS_BENCH_FULL", "0") != "1"
CASES = train.cases(DEVICE, QUICK)
PARAMS = [pytest.param(c, n, id=f"{c.name}-{n}") for c in CASES for n in c.contenders]
_inputs: dict = {}


def _case_inputs(case: harness.Case):
    if case.name not in _inputs:
        _inputs.clear()
        inputs = case.setup()
        _inputs[case.name] = (inputs, case.contenders[case.reference](inputs))
    return _inputs[case.name]


@pytest.mark.parametrize("case,contender", PARAMS)
def test_train(benchmark, case, contender):
    inputs, ref = _case_inputs(case)
    fn = case.contenders[contender]
    ok, why, _ = harness.compare(fn(inputs), ref, case.rtol, case.atol)
    assert ok, f"{contender} differs from {case.reference}: {why}"
    benchmark.group = case.name
    benchmark.extra_info.update(device=DEVICE, **case.params)

    def call():
        fn(inputs)
        harness.sync(DEVICE)

    benchmark.pedantic(call, rounds=3 if QUICK else 7, warmup_rounds=1, iterations=1)
    benchmark.extra_info["steps_per_s"] = case.params["steps"] / benchmark.stats.stats.median
