"""Papermill's parameters convention: the cell tagged ``parameters`` holds the defaults, and a
cell tagged ``injected-parameters`` with the given values is inserted after it (or at the top,
with a warning, when there is none). Unlike papermill, a name the parameters cell does not
define or a value of the wrong type is an error (``RunError``) before anything runs; values are
typed like the defaults, and written as Python code that evaluates to them (NaN and infinities
too)."""

from __future__ import annotations

import ast
import datetime as dt
import json
import keyword
import math
import re
from pathlib import Path
from typing import Any, Callable

import nbformat

from studio.execution.errors import RunError


def parameters_cell(notebook: Any) -> int | None:
    for index, cell in enumerate(notebook.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return index
    return None


def check_parameter_names(names: Any) -> None:
    """Every name must be a plain Python name: the injected cell assigns it as code."""
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise RunError(f"parameter name {name!r} is not a Python name (letters, digits and _, not a keyword)")


def declared_parameters(source: str) -> dict[str, Any]:
    """Names the parameters cell assigns, with their literal defaults (Ellipsis when not literal).

    ``a, b = 1, 2`` declares both names with their own defaults."""
    code = re.sub(r"^%%local[^\n]*\n", "", source)
    try:
        module = ast.parse(code)
    except SyntaxError as exc:
        raise RunError(f"the parameters cell does not parse: {exc}") from None
    declared: dict[str, Any] = {}

    def declare(target: ast.AST, value: ast.AST | None) -> None:
        if isinstance(target, ast.Name):
            try:
                declared[target.id] = ast.literal_eval(value) if value is not None else Ellipsis
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                declared[target.id] = Ellipsis
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = value.elts if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts) else None
            for index, element in enumerate(target.elts):
                declare(element.value if isinstance(element, ast.Starred) else element, values[index] if values else None)

    for node in module.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            declare(target, getattr(node, "value", None))
    return declared


def _infer(text: str) -> Any:
    """A command-line value without a typed default, read the way papermill's -p reads it."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _container(text: str, expected: type) -> Any:
    """A list, tuple, dict or set from the command line: JSON, or a Python literal."""
    try:
        parsed = json.loads(text)
    except ValueError:
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(text) from None
    return _as_container(parsed, expected)


def _as_container(value: Any, expected: type) -> Any:
    if expected in (tuple, set, frozenset) and isinstance(value, (list, tuple, set, frozenset)):
        return expected(value)
    if expected is list and isinstance(value, (tuple, list)):
        return list(value)
    if isinstance(value, expected):
        return value
    raise ValueError(value)


def _coerce(name: str, value: Any, default: Any, from_text: bool) -> Any:
    """The value in the type of the parameter's default; RunError when it cannot be."""
    if default is Ellipsis or default is None:
        return _infer(value) if from_text else value
    expected = type(default)
    if not from_text:
        if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if expected in (list, tuple, set, frozenset):
            try:
                return _as_container(value, expected)
            except ValueError:
                pass
        raise RunError(f"parameter '{name}' expects {expected.__name__} (default {default!r}), got {type(value).__name__} {value!r}")
    try:
        if expected is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if expected in (int, float, str):
            return expected(value)
        return _container(value, expected)
    except ValueError:
        raise RunError(f"parameter '{name}' expects {expected.__name__} (default {default!r}), got {value!r}") from None


def python_source(value: Any) -> str:
    """Python code that evaluates to ``value``: its repr, except that NaN and infinities (whose repr,
    ``nan``/``inf``, is no Python name) become ``float('nan')`` and ``float('inf')``, also inside
    lists, tuples, sets and dicts. RunError for a value that has no such code."""
    if isinstance(value, float) and not math.isfinite(value):
        return "float('nan')" if math.isnan(value) else "float('inf')" if value > 0 else "-float('inf')"
    if isinstance(value, list):
        return "[" + ", ".join(python_source(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(python_source(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, (set, frozenset)) and value:
        items = "{" + ", ".join(python_source(v) for v in value) + "}"
        return items if isinstance(value, set) else f"frozenset({items})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{python_source(k)}: {python_source(v)}" for k, v in value.items()) + "}"
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        same = False
    if not same:
        raise RunError(f"a parameter value of type {type(value).__name__} cannot be written as Python code: {text[:80]}")
    return text


def inject_parameters(notebook: Any, given: dict[str, tuple[Any, bool]], warn: Callable[[str], None]) -> dict[str, Any]:
    """Insert the injected-parameters cell; returns the typed values. ``given``: name -> (value, from_text)."""
    check_parameter_names(given)
    notebook.cells = [c for c in notebook.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    if not given:
        return {}
    index = parameters_cell(notebook)
    local = False
    if index is None:
        warn("the notebook has no cell tagged 'parameters'; injecting the parameters at the top")
        values = {name: (_infer(v) if text else v) for name, (v, text) in given.items()}
        position = 0
    else:
        source = notebook.cells[index].source
        local = source.lstrip().startswith("%%local")
        declared = declared_parameters(source)
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise RunError(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: the parameters cell defines "
                f"{', '.join(sorted(declared)) or 'none'}"
            )
        values = {name: _coerce(name, v, declared[name], text) for name, (v, text) in given.items()}
        position = index + 1
    lines = ["# Parameters injected by studio run"] + [f"{name} = {python_source(value)}" for name, value in values.items()]
    source = ("%%local\n" if local else "") + "\n".join(lines)
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(position, cell)
    return values


def load_parameter_file(path: Path) -> dict[str, Any]:
    """Parameters from YAML; dates and times (YAML reads ``2026-11-01`` as a date) become ISO text."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunError(f"cannot read parameters from {path}: {exc}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} must hold a mapping of parameter names to values")
    check_parameter_names(data)
    return {name: _plain(value, f"{path}: parameter '{name}'") for name, value in data.items()}


def _plain(value: Any, where: str) -> Any:
    """A YAML value as the plain Python value a parameter can take."""
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    raise RunError(f"{where} is a {type(value).__name__}; use text, numbers, booleans, lists or mappings")
