"""`wmkernels-train`: a thin pre-training driver for video world models on the wmkernels losses.

`python -m wmkernels.train --help` lists the options; `Trainer(make_config(...)).run()` is the API.
"""
from .config import ConfigError, Stage, TrainConfig, make_config, parse_args
from .loop import Trainer, TrainingStopped

__all__ = ["ConfigError", "Stage", "TrainConfig", "Trainer", "TrainingStopped", "make_config", "parse_args"]
