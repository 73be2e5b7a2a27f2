"""The fleet's models: strict at the edges, tolerant on the wire, small when carried across runs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from workflows.fleet_models import (
    MAX_NOTE,
    BatchSize,
    FleetAbort,
    FleetProgress,
    FleetRequest,
    FleetTarget,
    InstancesPage,
    InstanceState,
    RebuildOptions,
    Selection,
    StrictBatchSize,
    StrictFleetAbort,
    StrictFleetLimits,
    StrictFleetRequest,
    StrictFleetTarget,
    StrictRebuildOptions,
    StrictSelection,
)


def test_fleet_requests_are_checked_at_the_edge() -> None:
    with pytest.raises(ValidationError, match="either by a list or by a name pattern"):
        StrictSelection(hosts=["kvm-1"])
    with pytest.raises(ValidationError, match="needs the hosts"):
        StrictSelection(name_pattern="web-*")
    with pytest.raises(ValidationError, match="listed twice"):
        StrictSelection(instances=[FleetTarget(host="a", instance="b")] * 2)
    with pytest.raises(ValidationError, match="not a usable host name"):
        StrictSelection(instances=[FleetTarget(host="kvm:1", instance="web")])
    with pytest.raises(ValidationError, match="not a usable host name"):
        StrictFleetTarget(host="kvm:1", instance="web")
    with pytest.raises(ValidationError, match="image URL must be"):
        StrictRebuildOptions(image_url="ftp://x/y")
    with pytest.raises(ValidationError, match="max_unavailable"):
        StrictFleetLimits(max_unavailable=0)
    with pytest.raises(ValidationError, match="selection"):
        StrictFleetRequest.model_validate(
            {"name": "x", "rebuild": {"image_url": "http://images.example/a.qcow2"}, "selection": None}
        )
    with pytest.raises(ValidationError, match="reason"):
        StrictFleetAbort(reason="")
    with pytest.raises(ValidationError, match="batch_size"):
        StrictBatchSize(batch_size=0)
    assert StrictSelection(hosts=["kvm-1", "kvm-1"], name_pattern="*").hosts == ["kvm-1"]


def test_the_wire_forms_take_what_the_edge_would_refuse_so_a_running_fleet_always_replays() -> None:
    # A check tightened later must never fail the decode of a fleet (or its carried state) that an
    # older check let through: the wire models check types only.
    request = FleetRequest.model_validate(
        {
            "name": "not a fleet name!",
            "rebuild": {"image_url": "ftp://x/y", "stop_timeout_seconds": -1, "requested_by": ""},
            "selection": {"hosts": ["kvm:1"], "instances": [{"host": "kvm:1", "instance": "a b"}]},
            "limits": {"max_unavailable": 0, "batch_size": 0},
            "history_event_limit": 1,
            "carried": {"targets": [], "states": ["waiting"], "limits": {}},
            "a_field_of_a_newer_client": True,
        }
    )
    assert request.limits.max_unavailable == 0 and request.selection is not None
    assert FleetRequest.model_validate({"name": "x", "rebuild": {}, "selection": None}).selection is None
    assert FleetAbort(reason="").reason == "" and BatchSize(batch_size=0).batch_size == 0
    assert InstancesPage(offset=-1, limit=0).limit == 0
    assert "preflight" not in FleetAbort.model_fields


def test_a_strict_request_goes_on_the_wire_as_its_wire_form() -> None:
    strict = StrictFleetRequest(
        name="web",
        rebuild=StrictRebuildOptions(image_url="http://images.example/a.qcow2"),
        selection=StrictSelection(hosts=["kvm-1"], name_pattern="web-*"),
    )
    wire = strict.wire()
    assert type(wire) is FleetRequest and type(wire.rebuild) is RebuildOptions
    assert type(wire.selection) is Selection
    assert wire.model_dump() == strict.model_dump()


def test_the_state_carried_across_continue_as_new_stays_small_for_10000_instances() -> None:
    targets = [FleetTarget(host=f"kvm-{i % 100:03d}", instance=f"web-{i:05d}") for i in range(10_000)]
    request = FleetRequest(
        name="big",
        rebuild=RebuildOptions(image_url="http://images.example/a.qcow2"),
        selection=Selection(instances=targets),
    )
    progress = FleetProgress(
        targets=targets,
        states=[InstanceState.REBUILT] * 10_000,
        limits=request.limits,
        notes={i: "x" * MAX_NOTE for i in range(100)},
    )
    carried = request.model_copy(update={"carried": progress, "selection": None})
    size = len(carried.model_dump_json())
    # Temporal refuses payloads over 2 MB; stay well below.
    assert size < 1_000_000, size
    assert FleetRequest.model_validate_json(carried.model_dump_json()).carried == progress
