"""Every public name is documented (Args/Attributes + a doctest Example) and listed in the API page.

The examples are run as doctests here, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import doctest
import inspect
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_optax

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"
NAMES = sorted(lowbit_optax.__all__)


def _doc(name: str) -> str:
    return inspect.getdoc(getattr(lowbit_optax, name)) or ""


def _has_section(doc: str, *titles: str) -> bool:
    return any(re.search(rf"^{re.escape(t)}:\s*$", doc, re.MULTILINE) for t in titles)


def _takes_arguments(obj) -> bool:
    try:
        return bool(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return True


@pytest.mark.parametrize("name", NAMES)
def test_docstring_sections(name: str) -> None:
    obj = getattr(lowbit_optax, name)
    doc = _doc(name)
    assert doc, f"{name} has no docstring"
    assert _has_section(doc, "Example", "Examples"), f"{name}: no 'Example:' section"
    example = re.split(r"^Examples?:\s*$", doc, maxsplit=1, flags=re.MULTILINE)[1]
    assert ">>>" in example, f"{name}: its Example section has no '>>>' doctest lines"
    if inspect.isclass(obj):
        if _takes_arguments(obj) or getattr(obj, "_fields", None):
            assert _has_section(doc, "Attributes", "Args"), f"{name}: no 'Attributes:'/'Args:'"
    elif _takes_arguments(obj):
        assert _has_section(doc, "Args"), f"{name}: no 'Args:' section"


def _globs() -> dict:
    globs = dict(vars(lowbit_optax))
    globs.update(jax=jax, jnp=jnp, optax=optax, np=np)
    return globs


@pytest.mark.parametrize("name", NAMES)
def test_docstring_examples_run(name: str) -> None:
    obj = getattr(lowbit_optax, name)
    finder = doctest.DocTestFinder(recurse=False)
    tests = [t for t in finder.find(obj, name, globs=_globs()) if t.examples]
    assert tests, f"{name}: no doctest examples found"
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for test in tests:
        report: list[str] = []
        runner = doctest.DocTestRunner(optionflags=flags, verbose=False)
        result = runner.run(test, out=report.append)
        assert result.failed == 0, f"{name}: doctest failed\n" + "".join(report)


def test_api_page_lists_every_public_name() -> None:
    text = API_PAGE.read_text()
    listed = re.findall(r"^\s{0,4}([A-Za-z_][A-Za-z0-9_]*)\s*$", text, re.MULTILINE)
    missing = sorted(set(NAMES) - set(listed))
    assert not missing, f"docs/api.md does not list: {missing}"
    repeated = sorted({n for n in listed if listed.count(n) > 1 and n in NAMES})
    assert not repeated, f"docs/api.md lists these more than once: {repeated}"
    unknown = sorted(set(listed) - set(NAMES) - {"lowbit_optax"})
    assert not unknown, f"docs/api.md lists names that are not public: {unknown}"
