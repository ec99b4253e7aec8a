"""What the kernel completes and explains by itself, without the session: magic names (``%%lo``
-> ``%%local``), Spark SQL words in ``%%sql`` cells, and help for a magic on Shift-Tab."""

from __future__ import annotations

from studio.kernel.magics import CELL_MAGICS, REMOTE_LINE_MAGICS

WORD_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"

# The kernel's own magics first; IPython's common ones run locally as they are.
MAGICS = (
    *(f"%%{name}" for name in CELL_MAGICS if name != "pyspark"),
    "%%local", "%local", "%pip", *(f"%{name}" for name in REMOTE_LINE_MAGICS),
    "%%html", "%%writefile", "%%bash", "%%capture", "%time", "%env", "%who",
)  # fmt: skip

SQL_KEYWORDS = """
SELECT FROM WHERE GROUP BY ORDER HAVING LIMIT OFFSET JOIN INNER LEFT RIGHT FULL OUTER CROSS SEMI ANTI ON USING
AS AND OR NOT IN IS NULL LIKE ILIKE RLIKE BETWEEN EXISTS CASE WHEN THEN ELSE END DISTINCT ALL UNION INTERSECT EXCEPT
WITH INSERT INTO OVERWRITE TABLE VALUES CREATE REPLACE TEMPORARY VIEW DROP IF ALTER SHOW TABLES DATABASES
DESCRIBE EXPLAIN CACHE UNCACHE ASC DESC NULLS FIRST LAST OVER PARTITION WINDOW ROWS RANGE UNBOUNDED PRECEDING
FOLLOWING CURRENT ROW LATERAL PIVOT UNPIVOT TABLESAMPLE CAST TRUE FALSE INTERVAL
""".split()

SQL_FUNCTIONS = """
count sum avg min max first last collect_list collect_set approx_count_distinct stddev variance percentile_approx
coalesce nvl if ifnull nullif concat concat_ws substring substr upper lower trim length split regexp_replace
regexp_extract date_format to_date to_timestamp current_date current_timestamp date_add date_sub datediff year
month dayofmonth hour minute second round floor ceil abs sqrt exp log pow explode posexplode array map struct
size array_contains element_at row_number rank dense_rank lag lead ntile from_json to_json get_json_object
""".split()


def sql_words(word: str) -> list[str]:
    """SQL keywords (in the case the word was typed in) and functions that start with ``word``."""
    if not word:
        return []
    lowered = word.lower()
    upper = word[:1].isupper()
    keywords = [k if upper else k.lower() for k in SQL_KEYWORDS if k.lower().startswith(lowered)]
    functions = [f for f in SQL_FUNCTIONS if f.startswith(lowered)]
    return sorted(set(keywords)) + sorted(set(functions) - {k.lower() for k in keywords})


def magic_help(first_line: str, rows: list[tuple[str, str, str]]) -> str:
    """The %%help entry of the magic a cell starts with ("" for a magic the kernel does not own)."""
    name = first_line.split()[0] if first_line.split() else ""
    for usage, example, explanation in rows:
        if usage.split()[0] == name or (name.startswith("%%") and usage.split()[0] == name[1:]):
            return f"{usage}\n\n{explanation}" + (f"\n\nExample:\n{name}\n{example}" if example else "")
    return ""
