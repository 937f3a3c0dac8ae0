"""Benchmark suite: `wmkernels-bench` (`python -m wmkernels.bench`) times every op against eager
PyTorch and torch.compile; `harness.Case` is what each op's `wmkernels/bench/<op>.py` returns."""
