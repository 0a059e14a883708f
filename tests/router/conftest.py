"""Fixtures: simulators on free ports and a router over them, built with make_app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.router import RouterHandle, running_router
from tests.support.sim import SimHandle, running_sims


@pytest.fixture
async def sims() -> AsyncIterator[list[SimHandle]]:
    """Two fast simulators serving SIM_MODEL."""
    async with running_sims(2) as handles:
        yield handles


@pytest.fixture
async def router(sims: list[SimHandle]) -> AsyncIterator[RouterHandle]:
    """A router over the two simulators, both healthy."""
    async with running_router([s.url for s in sims]) as handle:
        yield handle
