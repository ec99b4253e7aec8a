"""Execution statuses and their transition table, and the JSON-lines channel `studio run --events`
writes and the executions manager follows. Pure logic and real files, no process."""

from __future__ import annotations

import json

import pytest

from studio.errors import StudioError
from studio.execution.events import EventReader, EventWriter
from studio.workspaces.models import (
    EXECUTION_TRANSITIONS,
    FINAL_STATUSES,
    STOP_STATUSES,
    ExecutionStatus,
    check_execution_transition,
)

S = ExecutionStatus


def test_every_status_has_a_row_and_the_paths_of_a_run_are_allowed():
    assert set(EXECUTION_TRANSITIONS) == set(ExecutionStatus)
    for path in (
        [S.START_PENDING, S.STARTING, S.RUNNING, S.FINISHING, S.FINISHED],
        [S.START_PENDING, S.STARTING, S.RUNNING, S.FAILING, S.FAILED],
        [S.START_PENDING, S.STARTING, S.RUNNING, S.STOP_PENDING, S.STOPPING, S.STOPPED],
        [S.START_PENDING, S.STOPPED],  # a queued run stopped before it started
        [S.START_PENDING, S.STARTING, S.START_PENDING],  # queued again after a restart lost it before a cell
        [S.START_PENDING, S.STARTING, S.RUNNING, S.FAILED],  # lost during a cell
    ):
        for current, new in zip(path, path[1:]):
            check_execution_transition(1, current, new)


@pytest.mark.parametrize(
    "current, new",
    [(S.FINISHED, S.RUNNING), (S.FAILED, S.START_PENDING), (S.STOPPED, S.STOPPING), (S.START_PENDING, S.RUNNING),
     (S.STOPPING, S.RUNNING), (S.FAILING, S.FINISHED), (S.FINISHING, S.START_PENDING)],
)  # fmt: skip
def test_what_the_table_does_not_allow_is_refused(current, new):
    with pytest.raises(StudioError, match=f"Execution 7 cannot go from {current.value} to {new.value}"):
        check_execution_transition(7, current, new)


def test_final_statuses_are_left_by_nothing():
    for new, allowed in EXECUTION_TRANSITIONS.items():
        assert not allowed & FINAL_STATUSES, new
    assert all(s.is_final for s in FINAL_STATUSES) and not STOP_STATUSES & FINAL_STATUSES


def test_events_are_read_as_whole_lines_as_they_come(tmp_path):
    path = tmp_path / "events.jsonl"
    reader = EventReader(path)
    assert reader.read() == []  # no file yet
    writer = EventWriter(path)
    writer.emit("started", pid=42)
    writer.emit("cell_finished", number=1, total=2, status="completed", ename=None)
    first = reader.read()
    assert [e["event"] for e in first] == ["started", "cell_finished"] and first[0]["pid"] == 42
    assert isinstance(first[0]["time"], float) and reader.read() == []
    with open(path, "a") as handle:  # half a line (being written), then garbage, then the rest
        handle.write('{"event": "finished", "exit_')
    assert reader.read() == []
    with open(path, "a") as handle:
        handle.write('code": 0}\nnot json\n[1]\n')
    assert reader.read() == [{"event": "finished", "exit_code": 0}]
    writer.close()
    assert (path.stat().st_mode & 0o777) == 0o600
    # A later server reads the whole file from the start.
    assert [e["event"] for e in EventReader(path).read()] == ["started", "cell_finished", "finished"]
    assert all(json.loads(line) for line in path.read_text().splitlines()[:2])


def test_no_path_writes_nothing(tmp_path):
    writer = EventWriter(None)
    writer.emit("started", pid=1)
    writer.close()
    assert list(tmp_path.iterdir()) == []
