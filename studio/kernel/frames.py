"""pandas <-> Arrow for the kernel: remote results into pandas DataFrames, local DataFrames out
to the session (``%%send_to_spark``).

Results keep what Spark knew about them: an integer or boolean column with nulls becomes pandas'
nullable ``Int64``/``boolean`` instead of ``float64``/``object``, and an array column whose
elements include nulls keeps them as ``None`` (Arrow-backed) instead of turning ``[1, null]``
into ``[1.0, nan]``. Columns without nulls get the plain numpy dtypes that ``toPandas()`` gives.
"""

from __future__ import annotations

import base64
from typing import Any

_NULLABLE_INTEGERS = {"int8": "Int8", "int16": "Int16", "int32": "Int32", "int64": "Int64",
                      "uint8": "UInt8", "uint16": "UInt16", "uint32": "UInt32", "uint64": "UInt64"}  # fmt: skip


def pandas_frame(table: Any) -> Any:
    """A pyarrow Table as a pandas DataFrame that loses no nulls (see the module docstring)."""
    import pandas as pd
    import pyarrow as pa

    frame = table.to_pandas()
    for index, column in enumerate(table.schema):  # by position: SQL results may repeat a name
        chunked, kind, dtype = table.column(index), column.type, None
        if pa.types.is_integer(kind) and chunked.null_count:
            dtype = pd.api.types.pandas_dtype(_NULLABLE_INTEGERS[str(kind)])
        elif pa.types.is_boolean(kind) and chunked.null_count:
            dtype = pd.BooleanDtype()
        elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _has_null_elements(chunked):
            dtype = pd.ArrowDtype(kind)
        if dtype is not None:
            frame.isetitem(index, chunked.to_pandas(types_mapper=lambda _, d=dtype: d))
    return frame


def _has_null_elements(chunked: Any) -> bool:
    return any(chunk.flatten().null_count for chunk in chunked.chunks)


def arrow_payload(frame: Any, max_rows: int) -> tuple[str, int, list[str]]:
    """(base64 Arrow IPC of the frame's first ``max_rows`` rows (all with -1), rows sent, notes).

    A named index (``groupby().sum()`` makes one) becomes columns, as ``reset_index()`` would make
    them; an unnamed default index is dropped. Notes say what was changed or cut."""
    import pandas as pd
    import pyarrow as pa

    notes: list[str] = []
    rows = frame if max_rows < 0 else frame.head(max_rows)
    if len(rows) < len(frame):
        notes.append(f"Only the first {len(rows):,} of {len(frame):,} rows were sent (-m {max_rows}; -m -1 sends all).")
    names = [n for n in rows.index.names if n is not None]
    if names:
        rows = rows.reset_index()
        notes.append(f"The index ({', '.join(map(str, names))}) became column{'s' if len(names) > 1 else ''}.")
    elif not (isinstance(rows.index, pd.RangeIndex) and rows.index.start == 0 and rows.index.step == 1):
        notes.append("The index has no name and was not sent (name it, or reset_index(), to send it).")
    if not all(isinstance(c, str) for c in rows.columns):
        rows = rows.rename(columns=str)
    table = pa.Table.from_pandas(rows, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii"), len(rows), notes
