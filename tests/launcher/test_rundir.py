"""state.json: what `status` and `down` read about units (process groups, containers)."""

from __future__ import annotations

import json

from vllm_fleet.launcher.plan_types import ReplicaSpec
from vllm_fleet.launcher.rundir import FleetState, UnitRecord


def test_units_round_trip_with_process_group_or_container() -> None:
    units = (
        UnitRecord(name="replica-0", role="replica", port=8001, url="u", container="vllm-x-r0"),
        UnitRecord(name="router", role="router", port=8000, url="v", pgid=4242),
    )
    state = FleetState(supervisor_pid=1, status="ready", router_url="v", units=units)
    again = FleetState.from_json(state.to_json())
    assert again == state
    assert again.pgids() == [4242]  # never a container's pid


def test_a_state_file_of_the_previous_version_still_reads() -> None:
    """Written before `pid` became `pgid`: `down` must still find that fleet's groups."""
    old = {
        "supervisor_pid": 1,
        "status": "ready",
        "router_url": "http://127.0.0.1:8000",
        "units": [{"name": "router", "role": "router", "port": 8000, "url": "v", "pid": 77}],
    }
    state = FleetState.from_json(json.dumps(old))
    assert state.units[0].pgid == 77
    assert state.units[0].container == ""


def test_a_server_listening_everywhere_is_reached_on_loopback() -> None:
    def url(host: str) -> str:
        return ReplicaSpec(name="r", host=host, port=9, model="m", command=("x",)).url

    assert url("0.0.0.0") == "http://127.0.0.1:9"
    assert url("") == "http://127.0.0.1:9"
    assert url("::") == "http://127.0.0.1:9"
    assert url("10.0.0.5") == "http://10.0.0.5:9"
    assert url("::1") == "http://[::1]:9"
