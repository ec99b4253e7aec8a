"""Papermill-style parameters of ``studio run`` and executions: names, declared defaults, typing
and the injected cell. Real nbformat notebooks, no kernel."""

from __future__ import annotations

import math

import nbformat
import pytest

from studio.execution import (
    RunError,
    check_parameter_names,
    declared_parameters,
    inject_parameters,
    load_parameter_file,
    python_source,
)


def notebook(parameters: str | None, *others: str):
    cells = [nbformat.v4.new_code_cell("import os")]
    if parameters is not None:
        cells.append(nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    cells += [nbformat.v4.new_code_cell(source) for source in others]
    return nbformat.v4.new_notebook(cells=cells)


def injected(nb) -> str:
    cells = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    return cells[0].source


@pytest.mark.parametrize("name", ["1day", "class", "a-b", "", "x y", 3, "a.b"])
def test_parameter_names_must_be_python_names(name):
    with pytest.raises(RunError, match="is not a Python name"):
        check_parameter_names([name])
    check_parameter_names(["day", "_x", "été"])


def test_declared_defaults():
    declared = declared_parameters(
        "day = '2026-11-22'\nrows: int = 10\na, b = 1, (2, 3)\n[c, *d] = [4, 5]\nlater = compute()\ne = f = 1.5\nx += 1"
    )
    assert declared == {"day": "2026-11-22", "rows": 10, "a": 1, "b": (2, 3), "c": 4, "d": 5, "later": Ellipsis,
                        "e": 1.5, "f": 1.5}  # fmt: skip
    assert declared_parameters("%%local\nday = 'x'") == {"day": "x"}
    with pytest.raises(RunError, match="the parameters cell does not parse"):
        declared_parameters("day = ")


def test_the_injected_cell_follows_the_parameters_cell_with_typed_values():
    nb = notebook("day = '2026-01-01'\nrows = 10\nratio = 0.5\nflag = False\nnames = ['a']", "print(day)")
    values = inject_parameters(
        nb,
        {"day": ("2026-11-22", True), "rows": ("25", True), "ratio": ("1", True), "flag": ("yes", True), "names": ('["x", "y"]', True)},
        warn=pytest.fail,
    )
    assert values == {"day": "2026-11-22", "rows": 25, "ratio": 1.0, "flag": True, "names": ["x", "y"]}
    assert [c.metadata.get("tags", []) for c in nb.cells] == [[], ["parameters"], ["injected-parameters"], []]
    assert injected(nb) == (
        "# Parameters injected by studio run\nday = '2026-11-22'\nrows = 25\nratio = 1.0\nflag = True\nnames = ['x', 'y']"
    )
    # injecting again replaces the cell instead of adding a second
    inject_parameters(nb, {"rows": (3, False)}, warn=pytest.fail)
    assert injected(nb).endswith("\nrows = 3")


def test_unknown_names_and_wrong_types_are_errors_before_anything_runs():
    nb = notebook("day = '2026-01-01'\nrows = 10\nflag = True")
    with pytest.raises(RunError, match=r"unknown parameters other, zzz: the parameters cell defines day, flag, rows"):
        inject_parameters(nb, {"zzz": ("1", True), "other": ("1", True)}, warn=pytest.fail)
    with pytest.raises(RunError, match=r"parameter 'rows' expects int \(default 10\), got 'ten'"):
        inject_parameters(nb, {"rows": ("ten", True)}, warn=pytest.fail)
    with pytest.raises(RunError, match=r"parameter 'rows' expects int \(default 10\), got bool True"):
        inject_parameters(nb, {"rows": (True, False)}, warn=pytest.fail)  # from JSON: a bool is no int
    with pytest.raises(RunError, match=r"parameter 'flag' expects bool"):
        inject_parameters(nb, {"flag": ("maybe", True)}, warn=pytest.fail)
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)


def test_without_a_parameters_cell_values_go_on_top_with_a_warning():
    warnings: list[str] = []
    nb = notebook(None, "print(x)")
    values = inject_parameters(nb, {"x": ("2", True), "y": ("two", True), "z": ("True", True)}, warnings.append)
    assert values == {"x": 2, "y": "two", "z": True}
    assert nb.cells[0].metadata["tags"] == ["injected-parameters"]
    assert warnings == ["the notebook has no cell tagged 'parameters'; injecting the parameters at the top"]


def test_a_local_parameters_cell_gets_a_local_injected_cell():
    nb = notebook("%%local\nday = 'x'")
    inject_parameters(nb, {"day": ("y", True)}, warn=pytest.fail)
    assert injected(nb).startswith("%%local\n# Parameters injected by studio run\nday = 'y'")


def test_nan_and_infinity_are_written_as_code_that_makes_them():
    nb = notebook("f = 1.0\nvalues = [0.0]")
    values = inject_parameters(nb, {"f": ("nan", True), "values": ([math.inf, -math.inf, 1], False)}, warn=pytest.fail)
    assert math.isnan(values["f"])
    assert injected(nb).splitlines()[1:] == ["f = float('nan')", "values = [float('inf'), -float('inf'), 1]"]
    assert python_source((1,)) == "(1,)"
    assert python_source({"a": {1, 2}}) in ("{'a': {1, 2}}", "{'a': {2, 1}}")
    assert python_source(frozenset({3})) == "frozenset({3})"
    with pytest.raises(RunError, match="cannot be written as Python code"):
        python_source(object())


def test_a_parameters_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("day: 2026-11-01\nrows: 5\nnames: [a, b]\nwhen: {at: 2026-11-01}\n")
    assert load_parameter_file(path) == {"day": "2026-11-01", "rows": 5, "names": ["a", "b"], "when": {"at": "2026-11-01"}}
    path.write_text("- 1\n- 2\n")
    with pytest.raises(RunError, match="must hold a mapping of parameter names to values"):
        load_parameter_file(path)
    path.write_text("1bad: 2\n")
    with pytest.raises(RunError, match="is not a Python name"):
        load_parameter_file(path)
    path.write_text("x: !!binary aGk=\n")
    with pytest.raises(RunError, match="parameter 'x' is a bytes"):
        load_parameter_file(path)
    with pytest.raises(RunError, match="cannot read parameters from"):
        load_parameter_file(tmp_path / "missing.yaml")
