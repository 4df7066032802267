"""The support matrix (``lacache.support``) declares every reachable option in one of two states, and holds:

* every cell names at least one test, and every named test exists (a function of that name in that file);
* a refused cell says where it is refused; an exact cell names what it is compared with;
* every generate mode of the installed transformers (``GenerationMode``) has a cell;
* docs/support.md is the rendered matrix (regenerate: ``python -m lacache.support > docs/support.md``).

The vLLM side's own coverage check (every ``SamplingParams`` field has a cell) runs with vLLM installed:
tests/serving/test_vllm_matrix.py::test_the_matrix_names_every_sampling_parameter.
"""

import ast
import functools
from pathlib import Path

import pytest

from lacache.support import EXACT, REFUSED, STATES, WHERE, Cell, cells, render

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _test_names(path: str) -> frozenset[str]:
    tree = ast.parse((ROOT / path).read_text())
    return frozenset(node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def test_every_cell_is_exact_or_refused_and_names_tests_that_exist():
    assert cells()
    for cell in cells():
        assert cell.state in STATES
        assert cell.note.strip(), cell
        if cell.state == REFUSED:
            assert cell.where in WHERE, cell
        for test in cell.tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).is_file(), f"{cell.option}: {path} does not exist"
            assert name in _test_names(path), f"{cell.option}: {test} does not exist"


def test_a_cell_without_a_test_or_a_state_cannot_be_declared():
    with pytest.raises(ValueError, match="names no test"):
        Cell("transformers", "x", "y", EXACT, "z", ())
    with pytest.raises(ValueError, match="state"):
        Cell("transformers", "x", "y", "partly", "z", ("tests/a.py::b",))
    with pytest.raises(ValueError, match="says where"):
        Cell("transformers", "x", "y", REFUSED, "z", ("tests/a.py::b",))


def test_every_transformers_generate_mode_has_a_cell():
    from transformers.generation.configuration_utils import GenerationMode

    options = " ".join(cell.option for cell in cells() if cell.backend == "transformers")
    missing = [mode.value for mode in GenerationMode if mode.value not in options]
    assert not missing, f"generate modes without a cell in lacache.support.transformers_cells: {missing}"


def test_the_docs_page_is_the_rendered_matrix():
    page = (ROOT / "docs" / "support.md").read_text()
    assert page == render(), "docs/support.md is stale: python -m lacache.support > docs/support.md"
