"""The documentation site builds without a warning and holds what it promises.

One Sphinx build per test session (``python -m sphinx -W --keep-going -b html docs OUT``,
in a subprocess; shared by the pytest-xdist workers through a lock file), then checks on
the built HTML: every public name has its API anchor, every notebook has a page with
its rendered outputs, every guide and technique page exists and is reachable from the
index. The notebooks render from their committed outputs (``nb_execution_mode="off"``),
so a notebook committed without outputs fails here.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("sphinx_book_theme")

import lowbit_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PAGES = [
    "index",
    "getting_started",
    "choosing",
    "memory",
    "sharding",
    "checkpointing",
    "benchmark",
    "techniques/quantized",
    "techniques/slim",
    "techniques/projection",
    "techniques/error_feedback",
    "techniques/quantize_state",
    "techniques/weights",
    "api",
]
BUILD_TIMEOUT = 600  # seconds; the build takes well under a minute on 2 CPU cores

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (POSIX), so that one xdist worker
    builds while the others wait; without ``fcntl`` no lock (one process runs it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(out: pathlib.Path) -> dict[str, object]:
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", str(DOCS), str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    return {"returncode": run.returncode, "stdout": run.stdout, "stderr": run.stderr}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The built HTML site (built once per session, whichever worker comes first)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's directory, common to every xdist worker
    out, record = shared / "docs_html", shared / "docs_build.json"
    with _locked(shared / "docs_build.lock"):
        if not record.exists():
            record.write_text(json.dumps(_build(out)))
    result = json.loads(record.read_text())
    if result["returncode"] != 0:
        warnings = [line for line in result["stderr"].splitlines() if line.strip()]
        pytest.fail(
            f"sphinx -W failed (exit {result['returncode']}) with {len(warnings)} line(s) of "
            "warnings/errors:\n" + "\n".join(warnings[-60:]),
            pytrace=False,
        )
    return out


def _html(site: pathlib.Path, page: str) -> str:
    path = site / f"{page}.html"
    assert path.is_file(), f"{page}.html was not built (expected {path})"
    return path.read_text(encoding="utf-8")


def test_every_public_name_has_its_api_anchor(site: pathlib.Path) -> None:
    ids: set[str] = set()
    for path in site.rglob("*.html"):
        ids.update(
            re.findall(r'id="(lowbit_optax\.[A-Za-z_][A-Za-z0-9_]*)"', path.read_text("utf-8"))
        )
    missing = [name for name in lowbit_optax.__all__ if f"lowbit_optax.{name}" not in ids]
    assert not missing, f'no id="lowbit_optax.NAME" anchor in the built HTML for: {missing}'


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_has_a_page_with_its_outputs(
    site: pathlib.Path, notebook: pathlib.Path
) -> None:
    html = _html(site, f"notebooks/{notebook.stem}")
    code_cells = html.count('class="cell docutils container"')
    outputs = html.count('class="cell_output docutils container"')
    assert code_cells > 0, f"{notebook.name}: its page shows no code cells"
    assert outputs > 0, (
        f"{notebook.name}: its page shows no cell outputs (the docs render committed outputs: "
        f"execute it with `jupyter nbconvert --to notebook --execute --inplace {notebook}`)"
    )


def test_the_notebooks_are_all_listed() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    unlisted = [p.stem for p in NOTEBOOKS if f"notebooks/{p.stem}" not in index]
    assert not unlisted, f"notebooks missing from docs/index.md's toctree: {unlisted}"


@pytest.mark.parametrize("page", PAGES)
def test_every_page_is_built_and_linked_from_the_index(site: pathlib.Path, page: str) -> None:
    html = _html(site, page)
    assert "<h1" in html, f"{page}.html has no title"
    if page != "index":
        assert f'href="{page}.html' in _html(site, "index"), f"index.html does not link {page}"
