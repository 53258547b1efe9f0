"""Sphinx configuration of the lowbit_optax documentation.

Build: ``pip install -e ".[docs]" && python -m sphinx -W -b html docs docs/_build/html``.
The notebooks are rendered from their committed outputs (``nb_execution_mode = "off"``);
the test suite executes them. They live in ``notebooks/`` at the repository root and are
copied into ``docs/notebooks/`` (git-ignored) at the start of each build.
"""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

project = "lowbit_optax"
author = "the lowbit_optax developers"
copyright = "2026, the lowbit_optax developers"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
]

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"

intersphinx_mapping = {}
html_theme = "sphinx_book_theme"
html_title = "lowbit_optax"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
# notebooks/low_rank_projection.ipynb has no H1 (its sections are H2): its toctree entry
# in index.md carries the title
suppress_warnings = ["myst.header"]


def _copy_notebooks() -> None:
    """Copies ``notebooks/*.ipynb`` next to the pages that list them."""
    target = HERE / "notebooks"
    target.mkdir(exist_ok=True)
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        dest = target / path.name
        if not dest.exists() or dest.read_bytes() != path.read_bytes():
            shutil.copyfile(path, dest)


_copy_notebooks()
