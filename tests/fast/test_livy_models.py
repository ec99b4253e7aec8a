"""Livy's request bodies, kinds, durations, memory sizes, states and paging: pure logic."""

from __future__ import annotations

import json

import pytest

from studio.errors import InvalidRequestError
from studio.livy import sparkconf
from studio.livy.models import (
    BATCH_TRANSITIONS,
    FINAL_STATES,
    SESSION_TRANSITIONS,
    STATEMENT_TRANSITIONS,
    CreateBatch,
    CreateSession,
    CreateStatement,
    SessionKind,
    SessionState,
    StatementState,
    check_memory,
    check_transition,
    parse_body,
    parse_duration,
    parse_kind,
    view,
)


def refused(model, body) -> str:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(InvalidRequestError) as caught:
        parse_body(model, raw)
    assert caught.value.status_code == 400
    return caught.value.msg


# -- bodies ------------------------------------------------------------------------------------


def test_a_session_body_takes_livys_fields_verbatim():
    body = parse_body(
        CreateSession,
        json.dumps(
            {
                "kind": "pyspark",
                "proxyUser": "ana",
                "driverMemory": "2g",
                "driverCores": "2",  # numeric strings pass for integers, as in Livy
                "conf": {"spark.sql.shuffle.partitions": 8, "spark.eventLog.enabled": True, "x": 1.5},
                "jars": None,
                "heartbeatTimeoutInSecond": 30,
                "ttl": "10m",
                "name": "etl",
            }
        ).encode(),
    )
    assert body.proxyUser == "ana" and body.driverCores == 2 and body.jars == []
    # conf values become strings, booleans as Spark writes them
    assert body.conf == {"spark.sql.shuffle.partitions": "8", "spark.eventLog.enabled": "true", "x": "1.5"}


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "the request body is empty"),
        (b"   ", "the request body is empty"),
        (b"{", "Malformed JSON in the request body"),
        (b"\xff\xfe", "Malformed JSON in the request body"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'"text"', "must be a JSON object, got str"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400_saying_so(raw, message):
    assert message in refused(CreateSession, raw)


def test_an_unknown_field_names_the_known_ones():
    message = refused(CreateStatement, {"code": "1", "kindd": "sql"})
    assert message == 'Unrecognized field "kindd" (known fields: code, kind).'


def test_a_missing_field_and_a_wrong_type_are_named():
    assert refused(CreateStatement, {}) == 'Field "code" is required.'
    message = refused(CreateSession, {"driverCores": "two", "conf": {"a": {"b": 1}}})
    assert 'Field "driverCores"' in message and '(got "two")' in message
    assert 'Field "conf"' in message and "conf values must be strings, numbers or booleans" in message


def test_a_long_wrong_value_is_cut_in_the_message():
    message = refused(CreateSession, {"driverCores": "x" * 500})
    assert "..." in message and len(message) < 300


def test_a_lone_surrogate_is_a_400_naming_the_field():
    # JSON's \udcff escape is half a character: no UTF-8 store or log can hold it.
    message = refused(CreateSession, b'{"conf": {"spark.app.name": "a\\udcffb"}}')
    assert message.startswith('Field "conf.spark.app.name" holds text that is not valid Unicode')
    assert refused(CreateStatement, b'{"code": "\\ud800"}').startswith('Field "code"')
    assert refused(CreateSession, b'{"jars": ["ok", "\\udfff"]}').startswith('Field "jars.1"')
    # in a key too, and the message itself stays valid UTF-8
    message = refused(CreateSession, b'{"conf": {"k\\udcff": "v"}}')
    message.encode("utf-8")
    assert "conf.k\\udcff" in message


def test_batch_args_turn_scalars_into_strings_and_refuse_the_rest():
    body = parse_body(CreateBatch, b'{"file": "job.py", "args": ["a", 1, 2.5, true], "pyFiles": null}')
    assert body.args == ["a", "1", "2.5", "true"] and body.pyFiles == []
    assert "args must be a list of strings" in refused(CreateBatch, {"file": "job.py", "args": [{"a": 1}]})
    assert refused(CreateBatch, {"args": []}) == 'Field "file" is required.'


# -- kinds, durations, memory ------------------------------------------------------------------


def test_kinds():
    assert parse_kind(None, statement=False) is None
    assert parse_kind("PySpark", statement=False) is SessionKind.PYSPARK
    assert parse_kind("python", statement=True) is SessionKind.PYSPARK
    assert parse_kind("shared", statement=False) is SessionKind.SHARED
    with pytest.raises(InvalidRequestError, match="Invalid statement kind 'shared'"):
        parse_kind("shared", statement=True)
    with pytest.raises(InvalidRequestError, match="Kind 'spark' is not supported"):
        parse_kind("spark", statement=False)
    with pytest.raises(InvalidRequestError, match=r"Invalid kind 'go': expected one of pyspark, sql, shared\."):
        parse_kind("go", statement=False)
    with pytest.raises(InvalidRequestError, match=r"Invalid kind 'go': expected one of pyspark, sql\."):
        parse_kind("go", statement=True)
    with pytest.raises(InvalidRequestError, match='must be a string, got 3'):
        parse_kind(3, statement=False)


@pytest.mark.parametrize(
    "text, seconds",
    [("500", 0.5), ("30s", 30), ("10m", 600), ("10min", 600), ("2h", 7200), ("1d", 86400), (" 5 MS ", 0.005), ("7us", 7e-6)],
)
def test_livy_durations_in_seconds(text, seconds):
    assert parse_duration(text, "ttl") == pytest.approx(seconds)


def test_a_bad_duration_says_how_to_write_one():
    assert parse_duration(None, "ttl") is None
    for bad in ("", "-5s", "1.5h", "10 parsecs", "s"):
        with pytest.raises(InvalidRequestError, match=f"invalid idleTimeout '{bad}': use a number with a unit"):
            parse_duration(bad, "idleTimeout")


def test_memory_sizes_as_spark_reads_them():
    for good in (None, "512m", "2g", "2G", "1024", " 3gb ", "1t"):
        check_memory(good, "driverMemory")
    for bad in ("2x", "1.5g", "-1g", "g", "3 gb", "two gigabytes"):
        with pytest.raises(InvalidRequestError, match=f"invalid driverMemory '{bad}'"):
            check_memory(bad, "driverMemory")


def test_settings_become_spark_conf_and_the_server_keeps_its_own():
    body = parse_body(
        CreateSession,
        b'{"driverMemory": "1g", "numExecutors": 2, "jars": ["a.jar", "b.jar"], '
        b'"conf": {"spark.sql.shuffle.partitions": "4", "livy.rsc.sql.num-rows": "10"}}',
    )
    conf = sparkconf.requested_conf(body)
    assert conf == {
        "spark.driver.memory": "1g",
        "spark.executor.instances": "2",
        "spark.jars": "a.jar,b.jar",
        "spark.sql.shuffle.partitions": "4",
        "livy.rsc.sql.num-rows": "10",
    }
    spark, service = sparkconf.split_service_conf(conf)
    assert service == {"livy.rsc.sql.num-rows": "10"} and "livy.rsc.sql.num-rows" not in spark
    assert sparkconf.needs_own_jvm(spark)
    assert not sparkconf.needs_own_jvm({"spark.sql.shuffle.partitions": "4"})
    with pytest.raises(InvalidRequestError, match="Blacklisted configuration values in session config: spark.master"):
        sparkconf.requested_conf(parse_body(CreateSession, b'{"conf": {"spark.master": "yarn"}}'))
    with pytest.raises(InvalidRequestError, match="executorCores must not be negative"):
        sparkconf.check_settings(parse_body(CreateSession, b'{"executorCores": -1}'))
    with pytest.raises(InvalidRequestError, match="invalid spark.executor.memory '4q'"):
        sparkconf.check_settings(parse_body(CreateSession, b'{"conf": {"spark.executor.memory": "4q"}}'))


def test_jvm_options_are_appended_not_replaced():
    base = {"spark.driver.extraJavaOptions": "-Xms64m", "spark.ui.port": "0"}
    own = {"spark.driver.extraJavaOptions": "-Dx=1", "spark.ui.port": "4040"}
    assert sparkconf.overlay(base, own) == {"spark.driver.extraJavaOptions": "-Xms64m -Dx=1", "spark.ui.port": "4040"}


# -- states ------------------------------------------------------------------------------------


def test_session_states_follow_livys_lifecycle():
    S = SessionState
    for current, new in [(S.STARTING, S.IDLE), (S.IDLE, S.BUSY), (S.BUSY, S.IDLE), (S.BUSY, S.SHUTTING_DOWN),
                         (S.SHUTTING_DOWN, S.DEAD), (S.STARTING, S.ERROR), (S.IDLE, S.KILLED)]:  # fmt: skip
        check_transition(SESSION_TRANSITIONS, current, new, "Session 1")
    for current, new in [(S.DEAD, S.IDLE), (S.IDLE, S.STARTING), (S.KILLED, S.DEAD), (S.STARTING, S.BUSY),
                         (S.SHUTTING_DOWN, S.IDLE), (S.ERROR, S.IDLE)]:  # fmt: skip
        with pytest.raises(RuntimeError, match=f"Session 1: illegal state change {current.value} -> {new.value}"):
            check_transition(SESSION_TRANSITIONS, current, new, "Session 1")
    # nothing leaves a final state
    for table in (SESSION_TRANSITIONS, BATCH_TRANSITIONS):
        for new, predecessors in table.items():
            assert not predecessors & FINAL_STATES, new
    assert all(state.is_final for state in FINAL_STATES) and not S.IDLE.is_final


def test_batch_states():
    S = SessionState
    for current, new in [(S.STARTING, S.RUNNING), (S.RUNNING, S.SUCCESS), (S.STARTING, S.DEAD), (S.RUNNING, S.KILLED)]:
        check_transition(BATCH_TRANSITIONS, current, new, "Batch 2")
    for current, new in [(S.SUCCESS, S.RUNNING), (S.RUNNING, S.STARTING), (S.RUNNING, S.IDLE)]:
        with pytest.raises(RuntimeError, match="Batch 2: illegal state change"):
            check_transition(BATCH_TRANSITIONS, current, new, "Batch 2")


def test_statement_states_mirror_livys_predecessor_table():
    W, R, A, CING, CED = (StatementState.WAITING, StatementState.RUNNING, StatementState.AVAILABLE,
                          StatementState.CANCELLING, StatementState.CANCELLED)  # fmt: skip
    allowed = {(W, R), (R, A), (R, CING), (W, CED), (CING, CED)}
    for current in StatementState:
        for new in StatementState:
            if (current, new) in allowed:
                check_transition(STATEMENT_TRANSITIONS, current, new, "Statement 0")
            else:
                with pytest.raises(RuntimeError):
                    check_transition(STATEMENT_TRANSITIONS, current, new, "Statement 0")
    assert {s for s in StatementState if s.is_final} == {A, CED}


# -- paging ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start, size, expected",
    [
        (0, 100, [0, 1, 2, 3, 4]),
        (2, 2, [2, 3]),
        (3, 100, [3, 4]),
        (9, 5, []),
        (0, 0, []),
        (-2, 4, [0, 1]),  # Scala's view(from, from + size): a negative from still ends at from + size
        (-5, 3, []),
        (1, -1, []),  # a size that ends before the start gives nothing
    ],
)
def test_list_paging_is_livys(start, size, expected):
    assert view(list(range(5)), start, size) == expected
