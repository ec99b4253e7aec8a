"""Livy's Python REPL rules (studio/worker/repl.py) with a plain namespace: no Spark, no worker."""

from __future__ import annotations

import datetime
import decimal
import json

import pytest

from studio.web import dumps, json_safe
from studio.worker.repl import PythonRepl, json_value, livy_table


@pytest.fixture
def repl():
    return PythonRepl({}, max_output_bytes=10_000)


def text(repl, code):
    output = repl.execute(1, code)
    assert output["status"] == "ok", output
    return output["data"]["text/plain"]


def failure(repl, code):
    output = repl.execute(7, code)
    assert output["status"] == "error", output
    assert set(output) == {"status", "ename", "evalue", "traceback"}
    return output


# -- text/plain ----------------------------------------------------------------------------------


def test_the_last_expression_is_shown_after_what_was_printed(repl):
    assert text(repl, "1 + 1") == "2"
    assert text(repl, "print('a')\n5") == "a\n5"
    assert text(repl, "x = 3") == ""
    assert text(repl, "x * 2") == "6"  # one namespace across statements
    assert text(repl, "None") == ""
    # the last top-level statement runs in interactive mode, as in Livy's fake_shell: a loop shows each value
    assert text(repl, "for i in range(2):\n    i") == "0\n1"
    assert text(repl, "for i in range(2):\n    i\ny = 0") == ""
    assert text(repl, "'text'  ") == "'text'"


def test_stdout_then_stderr_right_stripped(repl):
    code = "import sys\nsys.stderr.write('to stderr\\n')\nprint('to stdout')\nprint()\n"
    assert text(repl, code) == "to stdout\n\nto stderr"
    assert repl.execute(1, "pass") == {"status": "ok", "data": {"text/plain": ""}}


def test_a_cells_stdout_is_a_real_text_stream(repl):
    assert text(repl, "import sys\nsys.stdout.encoding") == "'utf-8'"
    assert text(repl, "sys.stdout.buffer.write(b'raw bytes ')\nsys.stdout.write(b'as bytes')\nNone") == "raw bytes as bytes"


def test_text_utf8_cannot_hold_comes_as_its_backslash_escape(repl):
    assert text(repl, "print('\\udcff')") == "\\udcff"
    assert text(repl, "import sys\nsys.stdout.buffer.write(b'\\xff\\n')\nNone") == "\\xff"
    assert text(repl, "print('é ✓')") == "é ✓"
    # a lone surrogate in the code itself is the statement's error, not a dead worker
    output = failure(repl, "x = '\udcff'")
    assert output["ename"] == "UnicodeEncodeError"
    assert text(repl, "1") == "1"


def test_what_is_printed_is_forwarded_as_it_is_written(repl):
    chunks: list[bytes] = []
    output = repl.execute(2, "print('one')\nprint('two')", forward=chunks.append)
    assert b"".join(chunks) == b"one\ntwo\n"
    assert output["data"]["text/plain"] == "one\ntwo"


# -- errors --------------------------------------------------------------------------------------


def test_an_error_has_the_cells_traceback_without_the_repls_frames(repl):
    output = failure(repl, "def f():\n    return 1 / 0\n\nf()")
    assert (output["ename"], output["evalue"]) == ("ZeroDivisionError", "division by zero")
    tb = output["traceback"]
    assert tb[0] == "Traceback (most recent call last):\n"
    assert tb[1].startswith('  File "<statement-7>", line 4, in <module>')
    assert any('line 2, in f' in line and "return 1 / 0" in line for line in tb)
    assert tb[-1] == "ZeroDivisionError: division by zero\n"
    assert not any("repl.py" in line for line in tb)


def test_syntax_errors_and_exits_are_errors_and_the_repl_lives_on(repl):
    output = failure(repl, "def broken(:\n    pass")
    assert output["ename"] == "SyntaxError"
    assert "".join(output["traceback"]).rstrip().endswith("SyntaxError: invalid syntax")
    assert failure(repl, "raise SystemExit(3)")["ename"] == "SystemExit"
    assert failure(repl, "raise KeyboardInterrupt")["ename"] == "KeyboardInterrupt"
    assert failure(repl, "undefined_name")["evalue"] == "name 'undefined_name' is not defined"
    assert text(repl, "'still here'") == "'still here'"


def test_printed_output_before_an_error_is_not_an_ok(repl):
    output = failure(repl, "print('half')\nraise ValueError('boom')")
    assert (output["ename"], output["evalue"]) == ("ValueError", "boom")


# -- magics --------------------------------------------------------------------------------------


def test_json_magic(repl):
    output = repl.execute(3, "x = {'a': [1, 2.5, None], 'b': 'ü'}\n%json x")
    assert output == {"status": "ok", "data": {"application/json": {"a": [1, 2.5, None], "b": "ü"}}}
    # printed text comes along as text/plain
    output = repl.execute(3, "print('hi')\n%json x")
    assert output["data"]["text/plain"] == "hi" and output["data"]["application/json"]["b"] == "ü"


def test_json_magic_errors_are_the_statements_not_the_interpreters(repl):
    assert failure(repl, "s = {1, 2}\n%json s")["ename"] == "TypeError"
    assert failure(repl, "%json missing")["evalue"] == "name 'missing' is not defined"
    assert failure(repl, "%json")["ename"] == "UnknownMagic"
    assert text(repl, "1") == "1"


def test_unknown_and_empty_magics(repl):
    output = failure(repl, "x = 1\n%nope x")
    assert (output["ename"], output["evalue"]) == ("UnknownMagic", "unknown magic command 'nope'")
    assert failure(repl, "%")["evalue"] == "magic command not specified"
    # a cell that fails to parse without any magic line reports its own syntax error
    assert failure(repl, "x = (1,\ny = 2")["ename"] == "SyntaxError"


def test_code_around_magic_lines_runs_in_order(repl):
    output = repl.execute(4, "a = [1]\n%json a\na.append(2)\n%json a")
    assert output["data"] == {"application/json": [1, 2]}
    # after a magic, a chunk without output clears the magic's result, like Livy's fake_shell
    assert repl.execute(4, "%json a\nb = 1")["data"] == {"text/plain": ""}


def test_table_magic(repl):
    repl.namespace["rows"] = [{"name": "a", "n": 1}, {"name": "b", "n": None}]
    output = repl.execute(5, "%table rows")
    assert output["data"]["application/vnd.livy.table.v1+json"] == {
        "headers": [{"name": "n", "type": "INT_TYPE"}, {"name": "name", "type": "STRING_TYPE"}],
        "data": [[1, "a"], [None, "b"]],
    }
    assert failure(repl, "bad = [[1], ['x']]\n%table bad")["evalue"] == "table rows have different types"
    assert failure(repl, "%table nothing")["ename"] == "NameError"


def test_livy_table_values():
    table = livy_table(
        [(True, 1.5, datetime.date(2026, 1, 2), decimal.Decimal("1.10"), [1, 2], {"k": "v"}, datetime.datetime(2026, 1, 2, 3, 4))]
    )
    assert [h["type"] for h in table["headers"]] == [
        "BOOLEAN_TYPE", "DOUBLE_TYPE", "DATE_TYPE", "DECIMAL_TYPE", "ARRAY_TYPE", "MAP_TYPE", "TIMESTAMP_TYPE",
    ]  # fmt: skip
    assert table["data"] == [[True, 1.5, "2026-01-02", "1.10", [1, 2], {"k": "v"}, "2026-01-02 03:04:00"]]
    assert livy_table(7) == {"headers": [{"name": "0", "type": "INT_TYPE"}], "data": [[7]]}
    with pytest.raises(ValueError, match="inconsistent types"):
        livy_table([[[1, "x"]]])


def test_matplot_without_a_figure_says_so(repl):
    class Pyplot:  # the part of matplotlib.pyplot %matplot asks first
        @staticmethod
        def get_fignums():
            return []

    repl.namespace["plt"] = Pyplot
    assert text(repl, "%matplot plt").startswith("%matplot plt: there is no figure to show")


# -- output limits -------------------------------------------------------------------------------


def test_text_over_the_limit_is_cut_at_a_character_in_utf8_bytes():
    repl = PythonRepl({}, max_output_bytes=101)
    out = text(repl, "print('é' * 100)")  # 200 bytes once right-stripped
    head, note = out.split("\n")
    assert head == "é" * 50  # 101 bytes cut inside the 51st character: it is dropped whole
    assert note == "[output truncated: showing 101 of 200 bytes; the limit is STUDIO_MAX_OUTPUT_BYTES]"


def test_other_output_over_the_limit_is_dropped_with_a_note():
    repl = PythonRepl({"big": list(range(100))}, max_output_bytes=50)
    output = repl.execute(6, "%json big")
    assert "application/json" not in output["data"]
    assert output["data"]["text/plain"].startswith("[application/json output of 390 bytes dropped: over the 50-byte limit")


# -- valid JSON for every value ------------------------------------------------------------------


def test_floats_json_cannot_hold_travel_as_spark_writes_them(repl):
    output = repl.execute(8, "import math\nv = [math.nan, math.inf, -math.inf, 1.5]\n%json v")
    assert json.loads(dumps(output)) == {"status": "ok", "data": {"application/json": ["NaN", "Infinity", "-Infinity", 1.5]}}
    assert json_safe({"k\udcff": ["\udcff", float("nan")], 3: (1, 2)}) == {"k\\udcff": ["\\udcff", "NaN"], 3: [1, 2]}
    assert dumps({"a": 1, "b": "ü"}) == '{"a":1,"b":"ü"}'.encode()


def test_spark_values_as_plain_json():
    class Row:
        def asDict(self):
            return {"when": datetime.datetime(2026, 1, 2, 3, 4, 5), "amount": decimal.Decimal("2.50")}

    assert json_value(Row()) == {"when": "2026-01-02T03:04:05", "amount": 2.5}
    assert json_value([b"\x00\x01", datetime.timedelta(minutes=1), datetime.time(1, 2), {1: None}]) == [
        "AAE=", 60.0, "01:02:00", {"1": None},
    ]  # fmt: skip
