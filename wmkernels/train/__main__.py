"""Command-line entry point: `wmkernels-train` / `python -m wmkernels.train` (also under torchrun)."""
from __future__ import annotations

import logging
import os
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, parse_args
from .data import DataError
from .loop import Trainer, TrainingStopped

log = logging.getLogger("wmkernels.train")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(message)s" if "WORLD_SIZE" in os.environ else "%(message)s")
    try:
        summary = Trainer(cfg).run()
    except (ConfigError, DataError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    except TrainingStopped as e:
        log.error("%s", e)
        return 3
    if rank == 0:
        losses = [h["loss"] for h in summary["history"]]
        shown = f", loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""  # none before the first log_every
        evals = ", ".join(f"{k} {v:.4g}" for k, v in summary["eval"].items())
        log.info("done: %d steps%s; held-out %s; checkpoint %s; sample %s", summary["step"], shown, evals,
                 summary["checkpoint"], summary["sample"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
