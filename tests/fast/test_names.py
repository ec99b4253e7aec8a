"""Workspace and compute names, ids in URLs, compute URLs, and the workspace state table."""

from __future__ import annotations

import pytest

from studio.errors import InvalidRequestError, NotFoundError
from studio.workspaces.models import (
    MAX_NAME_LENGTH,
    OPEN_STATES,
    RUNNING_STATES,
    TRANSITIONS,
    WorkspaceState,
    check_livy_url,
    check_name,
    record_id,
)


@pytest.mark.parametrize("name", ["sales", "Sales_2026", "a.b-c", "_x", "-x", "9", "x" * MAX_NAME_LENGTH])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "Workspace name is empty"),
        (None, "Workspace name is empty"),
        (7, "Workspace name is empty"),
        ("x" * (MAX_NAME_LENGTH + 1), "is longer than 64 characters"),
        ("a/b", "contains a slash; a name is one folder, not a path"),
        ("..\\x", "contains a slash"),
        ("..", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("with space", "may contain only letters, digits, '-', '_' and '.'"),
        ("naïve", "may contain only letters"),
        ("a\nb", "may contain only letters"),
    ],
)
def test_bad_names_say_what_is_wrong(name, message):
    with pytest.raises(InvalidRequestError) as caught:
        check_name(name, "Workspace")
    assert message in caught.value.msg


def test_a_compute_name_says_compute():
    with pytest.raises(InvalidRequestError, match="^Compute name 'a b'"):
        check_name("a b", "Compute")


def test_record_ids():
    assert record_id("12", "Workspace") == 12 and record_id(3, "Execution") == 3
    with pytest.raises(NotFoundError, match="Workspace 'sales' not found; workspace ids are integers."):
        record_id("sales", "Workspace")


@pytest.mark.parametrize(
    "url, clean",
    [("http://127.0.0.1:8998/", "http://127.0.0.1:8998"), (" https://livy.example/base// ", "https://livy.example/base")],
)
def test_compute_urls(url, clean):
    assert check_livy_url(url) == clean


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "Compute URL is empty"),
        (None, "Compute URL is empty"),
        ("ftp://host", "is not an http:// or https:// URL with a host"),
        ("http://", "is not an http:// or https:// URL with a host"),
        ("javascript:alert(1)", "is not an http:// or https:// URL"),
        ("http://h/?x=1", "must not have a query or fragment"),
        ("http://h/#top", "must not have a query or fragment"),
        ("http://h:99999", "has an invalid port"),
    ],
)
def test_bad_compute_urls(url, message):
    with pytest.raises(InvalidRequestError, match=message.replace("?", r"\?")):
        check_livy_url(url)


def test_workspace_states_are_emrs_plus_failed():
    assert {s.value for s in WorkspaceState} == {
        "Idle", "Starting", "Ready", "Attaching", "Attached", "Stopping", "Deleting", "Failed",
    }  # fmt: skip
    assert OPEN_STATES <= RUNNING_STATES and all(s.is_running for s in RUNNING_STATES)
    assert not WorkspaceState.IDLE.is_running


@pytest.mark.parametrize(
    "current, new, allowed",
    [
        ("Idle", "Starting", True),
        ("Starting", "Ready", True),
        ("Starting", "Attaching", True),  # attached before it started
        ("Attaching", "Attached", True),
        ("Attached", "Ready", True),  # detach
        ("Attached", "Stopping", True),
        ("Stopping", "Idle", True),
        ("Failed", "Idle", True),  # a stop acknowledges the failure
        ("Idle", "Deleting", True),
        ("Starting", "Failed", True),
        ("Idle", "Ready", False),
        ("Idle", "Attached", False),
        ("Ready", "Attached", False),  # only through Attaching
        ("Attached", "Deleting", False),  # stop first
        ("Deleting", "Idle", False),
        ("Stopping", "Starting", False),
    ],
)
def test_workspace_transitions(current, new, allowed):
    assert (WorkspaceState(current) in TRANSITIONS[WorkspaceState(new)]) is allowed


def test_every_workspace_state_can_be_reached_and_left():
    reachable = set(TRANSITIONS)
    leavable = {state for predecessors in TRANSITIONS.values() for state in predecessors}
    assert reachable == set(WorkspaceState) and leavable == set(WorkspaceState) - {WorkspaceState.DELETING}
