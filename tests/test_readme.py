"""README drift: the command-line flags it shows exist, and the repository paths it names exist."""
import re
from pathlib import Path

import pytest

from wmkernels.bench.__main__ import parse_args as bench_parse_args
from wmkernels.train.config import build_parser as train_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
NOT_OURS = {"--no-build-isolation", "--nproc"}  # pip's and torchrun's (--nproc_per_node)


def test_every_flag_shown_exists(capsys):
    with pytest.raises(SystemExit):
        bench_parse_args(["--help"])
    ours = set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
    ours |= {opt for a in train_parser()._actions for opt in a.option_strings}
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README)) - NOT_OURS
    assert shown and shown <= ours, sorted(shown - ours)


def test_every_path_named_exists():
    named = set(re.findall(r"`((?:benchmarks|csrc|tests|wmkernels|\.ci)/[\w./-]*)`", README))
    assert named and not [p for p in named if not (ROOT / p).exists()]
