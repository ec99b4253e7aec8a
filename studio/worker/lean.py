"""Keep the driver's Python small.

PySpark registers two py4j input converters for numpy values whose ``can_convert`` imports
``pyspark.testing.utils`` to learn whether numpy is installed. That module imports pandas and
pyarrow, so the very first py4j call of a driver pulls ~85 MB of libraries into every idle
session. An object can only be a numpy value if numpy is already imported, so asking
``sys.modules`` answers the same question without importing anything.
"""

from __future__ import annotations

import sys
from typing import Any


def _numpy() -> Any:
    return sys.modules.get("numpy")


def _can_convert_array(self: Any, obj: Any) -> bool:
    np = _numpy()
    return np is not None and isinstance(obj, np.ndarray) and obj.ndim == 1


def _can_convert_scalar(self: Any, obj: Any) -> bool:
    np = _numpy()
    return np is not None and isinstance(obj, np.generic)


def patch_numpy_converters() -> None:
    """Replace the two converters' checks (class attributes, so registered instances follow)."""
    from pyspark.sql import types

    for name, check in (("NumpyArrayConverter", _can_convert_array), ("NumpyScalarConverter", _can_convert_scalar)):
        converter = getattr(types, name, None)
        if converter is not None:
            converter.can_convert = check
