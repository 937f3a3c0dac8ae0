"""Shared pytest-benchmark plumbing of the `bench_<op>.py` files: the device/mode switches, the
(case, contender) parameters, the inputs of one case at a time, the equality check against the
reference contender and the timed run. Imported as `_cases` (pytest puts benchmarks/ on sys.path)."""
import os
from typing import Callable, Iterable

import pytest
import torch

from wmkernels.bench import harness

DEVICE = os.environ.get("WMKERNELS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("WMKERNELS_BENCH_FULL", "0") != "1"


def params(cases: list[harness.Case], contenders: Callable[[harness.Case], Iterable[str]] | None = None) -> list:
    """One pytest.param(case, contender) per contender of each case (by default the ones active in this mode)."""
    contenders = contenders or (lambda c: harness.active_contenders(c, QUICK))
    return [pytest.param(c, n, id=f"{c.name}-{n}") for c in cases for n in contenders(c)]


class CaseInputs:
    """Inputs and reference output of one case, kept while its contenders run (one case at a time)."""

    def __init__(self, seed: int | None = 0, recompiles: bool = True):
        self.seed, self.recompiles, self._inputs = seed, recompiles, {}

    def __call__(self, case: harness.Case):
        if case.name not in self._inputs:
            self._inputs.clear()
            if self.recompiles:
                harness.allow_recompiles()
            if self.seed is not None:
                torch.manual_seed(self.seed)
            inputs = case.setup()
            self._inputs[case.name] = (inputs, case.contenders[case.reference](inputs))
        return self._inputs[case.name]


def check(case: harness.Case, contender: str, inputs, ref) -> Callable:
    """The contender's function, after asserting its output equals the reference's."""
    fn = case.contenders[contender]
    ok, why, _ = harness.compare(fn(inputs), ref, case.rtol, case.atol)
    assert ok, f"{contender} differs from {case.reference}: {why}"
    return fn


def run(benchmark, case: harness.Case, fn: Callable, inputs, rounds: int, warmup_rounds: int, **extra_info) -> float | None:
    """Time `fn(inputs)` (synchronized) under `benchmark`; the median seconds, None under --benchmark-disable."""
    benchmark.group = case.name
    benchmark.extra_info.update(device=DEVICE, **extra_info)

    def call():
        fn(inputs)
        harness.sync(DEVICE)

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return None if benchmark.stats is None else benchmark.stats.stats.median
