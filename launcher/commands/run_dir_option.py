"""The ``--run-dir`` option of `up`, `status` and `down`: where one fleet keeps its files.

``status`` and ``down`` run in other shells than ``up``, often much later; the run directory is
all they share, so the three commands must agree on the flag and its default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_fleet.launcher.rundir import RunDir

#: the run directory when neither --run-dir nor (for `up`) run_dir: in --config names one.
DEFAULT_RUN_DIR = Path(".fleet")


def add_run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help=f"where state.json, backends.yaml and logs/ live (default: {DEFAULT_RUN_DIR})",
    )


def run_dir_from_args(args: argparse.Namespace) -> RunDir:
    """The run directory `status` and `down` act on."""
    return RunDir(Path(args.run_dir) if args.run_dir else DEFAULT_RUN_DIR)
