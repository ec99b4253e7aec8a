"""The kernel's magic parsing (studio/kernel/magics.py): routing, flags and usage errors."""

from __future__ import annotations

import pytest

from studio.kernel.magics import HELP_ROWS, PARSERS, MagicUsageError, parse_cell, parse_configure_body


@pytest.mark.parametrize(
    "code, kind",
    [
        ("", "empty"),
        ("  \n ", "empty"),
        ("spark.range(3).count()", "remote"),
        ("%%local\nimport os", "local"),
        ("%local\nimport os", "local"),
        ("!ls -l", "ipython"),
        ("%%html\n<b>x</b>", "ipython"),
        ("%env A=1", "ipython"),
        ("%matplot plt", "remote"),
        ("%json x", "remote"),
        ("%table rows", "remote"),
        ("%%info", "info"),
        ("\n  %%logs", "logs"),
    ],
)
def test_cells_are_routed_by_their_first_line(code, kind):
    assert parse_cell(code).kind == kind


def test_local_cells_drop_the_magic_line_and_remote_ones_keep_everything():
    assert parse_cell("%%local\na = 1\nb = 2").body == "a = 1\nb = 2"
    assert parse_cell("%matplot plt").body == "%matplot plt"
    assert parse_cell("!echo hi").body == "!echo hi"


def test_sql_flags_as_sparkmagic_writes_them():
    cell = parse_cell("%%sql -o rows -q -n 10 -m sample -r 0.5\nSELECT 1")
    assert cell.kind == "sql" and cell.body == "SELECT 1"
    args = cell.args
    assert (args.output, args.quiet, args.maxrows, args.samplemethod, args.samplefraction) == ("rows", True, 10, "sample", 0.5)
    defaults = parse_cell("%%sql\nSELECT 1").args
    assert (defaults.output, defaults.quiet, defaults.maxrows, defaults.samplemethod) == (None, False, None, "take")
    assert parse_cell("%%sql -n -1\nSELECT 1").args.maxrows == -1
    assert parse_cell("%%spark -o df\ndf = spark.range(3)").args.output == "df"


@pytest.mark.parametrize(
    "code, message",
    [
        ("%%sql -o 1bad\nSELECT 1", "'1bad' is not a valid Python variable name"),
        ("%%sql -o class\nSELECT 1", "'class' is not a valid Python variable name"),
        ("%%sql -m everything\nSELECT 1", "invalid choice: 'everything'"),
        ("%%sql --nope\nSELECT 1", "unrecognized arguments: --nope"),
        ("%%sql -n ten\nSELECT 1", "invalid int value: 'ten'"),
        ("%%delete -f", "the following arguments are required: -s/--session"),
        ("%%info\nsomething", "Cell body for %%info magic must be empty."),
        ("%%sql 'unclosed\nSELECT 1", "cannot parse the magic's arguments"),
        ("%%display --chart donut\ndf", "invalid choice: 'donut'"),
    ],
)
def test_bad_magic_syntax_says_what_and_how(code, message):
    with pytest.raises(MagicUsageError) as caught:
        parse_cell(code)
    assert message in str(caught.value)


def test_usage_is_in_the_message():
    with pytest.raises(MagicUsageError, match=r"^%%delete: .*Usage: %%delete \[-f\] -s SESSION_ID"):
        parse_cell("%%delete -s x")


def test_configure_cleanup_delete_and_send_to_spark():
    assert parse_cell("%%configure -f\n{}").args.force is True
    assert parse_cell("%%configure\n{}").args.force is False
    assert parse_cell("%%cleanup -f").args.force is True
    assert parse_cell("%%delete -f -s 12").args.session_id == 12
    args = parse_cell("%%send_to_spark -i local_df -t df -n remote_df -m 5").args
    assert (args.input, args.type, args.name, args.maxrows) == ("local_df", "df", "remote_df", 5)
    assert parse_cell("%%send_to_spark -i text").args.maxrows == -1  # every row unless told


def test_display_keeps_the_expression_as_written():
    cell = parse_cell("%%display --chart bar --x zone --y 'trips,fares' df.where(F.col('id') > 1) -n 20")
    args = cell.args
    assert (args.chart, args.x, args.y, args.rows) == ("bar", "zone", "trips,fares", 20)
    assert args.expression == "df.where(F.col('id') > 1)"
    assert parse_cell("%%display\nx = 1\ndf").args.expression == ""
    assert parse_cell("%%display --title='A title' df").args.title == "A title"


def test_time_and_pip():
    cell = parse_cell("%%time\nspark.range(10).count()")
    assert (cell.kind, cell.body) == ("time", "spark.range(10).count()")
    cell = parse_cell("%time spark.range(10).count()")
    assert (cell.kind, cell.body) == ("time", "spark.range(10).count()")
    cell = parse_cell("%pip install 'arrow>=1' --quiet")
    assert (cell.kind, cell.args.argv) == ("pip", ["install", "arrow>=1", "--quiet"])


def test_configure_body():
    assert parse_configure_body("") == {}
    assert parse_configure_body('{"driverMemory": "2g"}') == {"driverMemory": "2g"}
    with pytest.raises(MagicUsageError, match="Could not parse JSON object from input"):
        parse_configure_body("{driverMemory: 2g}")
    with pytest.raises(MagicUsageError, match="needs a JSON object of session settings, got list"):
        parse_configure_body("[1]")


def test_help_names_every_kernel_magic():
    helped = " ".join(row[0] for row in HELP_ROWS)
    for name in PARSERS:
        if name not in ("pyspark",):  # %%pyspark is sparkmagic's alias of a plain remote cell
            assert f"%%{name}" in helped, name
