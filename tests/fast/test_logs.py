"""Line-addressed log reading and Livy's /log paging, on real files that grow while read."""

from __future__ import annotations

import pytest

from studio.livy.logs import LogFile, RetainedLogs


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "worker.log"
    path.write_bytes(b"".join(f"line {i}\n".encode() for i in range(10)))
    return LogFile(path)


def test_lines_by_number(log):
    assert log.total() == 10
    assert log.lines(0, 3) == ["line 0", "line 1", "line 2"]
    assert log.lines(8, 5) == ["line 8", "line 9"]
    assert log.lines(10, 5) == [] and log.lines(3, 0) == []
    assert log.lines(-4, 2) == ["line 0", "line 1"]
    assert log.lines(7, -1) == ["line 7", "line 8", "line 9"]
    assert log.tail(2) == ["line 8", "line 9"]


def test_livy_paging_defaults_to_the_tail_of_100(tmp_path):
    path = tmp_path / "long.log"
    path.write_text("".join(f"{i}\n" for i in range(250)))
    log = LogFile(path)
    start, total, lines = log.page(None, None, max_lines=10_000)
    assert (start, total, len(lines), lines[0], lines[-1]) == (150, 250, 100, "150", "249")
    assert log.page(-1, 5, 10_000) == (245, 250, ["245", "246", "247", "248", "249"])
    assert log.page(10, 3, 10_000) == (10, 250, ["10", "11", "12"])
    # a negative size is "all", but never more than max_lines: then the newest max_lines
    start, total, lines = log.page(None, -1, max_lines=40)
    assert (start, total, lines[0], len(lines)) == (210, 250, "210", 40)
    start, total, lines = log.page(0, -1, max_lines=40)
    assert (start, lines[0], len(lines)) == (0, "0", 40)
    assert log.page(300, 10, 10_000) == (300, 250, [])


def test_a_growing_log_with_a_partial_last_line(tmp_path):
    path = tmp_path / "growing.log"
    path.write_bytes(b"first\nsecond")
    log = LogFile(path)
    assert log.total() == 2
    assert log.lines(0, 10) == ["first", "second"]
    with open(path, "ab") as handle:
        handle.write(b" half\nthird\r\n")
    assert log.total() == 3
    assert log.lines(1, 10) == ["second half", "third"]
    log.append("Session 3 ended: the idle timeout (1h) passed")
    lines = log.tail(1)
    assert lines[0].endswith(" INFO StudioService: Session 3 ended: the idle timeout (1h) passed")
    assert log.total() == 4


def test_a_rewritten_log_is_indexed_again_and_bad_bytes_are_replaced(tmp_path):
    path = tmp_path / "rewritten.log"
    path.write_bytes(b"a\nb\nc\nd\n")
    log = LogFile(path)
    assert log.total() == 4
    path.write_bytes(b"\xff\xfe\nz\n")  # shorter than what was indexed: a new file (a rotated log)
    assert log.total() == 2
    assert log.lines(0, 2) == ["\ufffd\ufffd", "z"]


def test_a_missing_log_is_empty(tmp_path):
    log = LogFile(tmp_path / "never-written.log")
    assert log.total() == 0 and log.lines(0, 10) == [] and log.page(None, None, 100) == (0, 0, [])


def test_retained_logs_go_after_their_time(tmp_path):
    kept = RetainedLogs()
    log = LogFile(tmp_path / "x.log")
    kept.keep(4, log)
    kept.cull(retain=60)
    assert kept.get(4) is log
    kept.cull(retain=-1)
    assert kept.get(4) is None and kept.get(5) is None
