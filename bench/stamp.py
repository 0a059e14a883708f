"""Which code a figure was measured at: the commit and whether the tree differed from it.

Every stored section carries the stamp of the run that produced it, so the published tables can
say which commit each figure comes from, and a run on uncommitted code says so.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: What a run writes or a person edits without changing what is measured: the results, the
#: rendered pages and their images, prose. Changes there do not make a tree dirty.
NOT_MEASURED = (":(exclude)bench/results", ":(exclude)docs/img", ":(exclude,glob)**/*.md")
GIT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Stamp:
    """`commit` is the short hash ("" outside a git checkout); `dirty` is None when unknown
    (results stored before the flag was recorded)."""

    commit: str
    dirty: bool | None

    @property
    def label(self) -> str:
        """How tables name it: `c4ff45e`, `c4ff45e+dirty`, `c4ff45e (tree not recorded)`."""
        commit = self.commit or "unknown commit"
        if self.dirty is None:
            return f"{commit} (tree not recorded)"
        return f"{commit}+dirty" if self.dirty else commit


def current_stamp(repo: Path) -> Stamp:
    """HEAD of `repo` and whether tracked or untracked (not ignored) code differs from it."""
    commit = _git(repo, "rev-parse", "--short", "HEAD")
    if commit is None:
        return Stamp("", None)
    status = _git(repo, "status", "--porcelain", "--", ".", *NOT_MEASURED)
    return Stamp(commit, None if status is None else bool(status))


@functools.cache
def run_stamp(repo: Path) -> Stamp:
    """The stamp of the code this process measures: taken at the first call and kept. A run
    lasts an hour; commits made meanwhile (prose, results) must not relabel what it measured:
    the versions table once named a later commit than the sections' stamps."""
    return current_stamp(repo)


def _git(repo: Path, *args: str) -> str | None:
    """Output of `git args` in `repo`, None when git is missing or fails (not a checkout)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
