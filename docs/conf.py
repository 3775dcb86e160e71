"""Sphinx configuration: MyST Markdown pages and an API reference from the docstrings."""

import os
import sys

# Document the checkout being built, not whatever kdjax happens to be installed.
sys.path.insert(0, os.path.abspath(".."))

import kdjax  # noqa: E402

project = "kdjax"
author = "kdjax authors"
copyright = "kdjax authors"
release = kdjax.__version__
version = kdjax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: anchors for section links (page.md#section), $...$ maths where a page wants it.
myst_heading_anchors = 4
myst_enable_extensions = ["dollarmath"]

# API reference: one generated page per public name, written under _autosummary at build time.
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
autodoc_member_order = "bysource"
# Signatures show names and defaults; the docstrings give each argument's shape and dtype
# (ArrayLike would otherwise print as its eight-member union).
autodoc_typehints = "none"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"kdjax {release}"
html_static_path = []
pygments_style = "friendly"


# Tuples of names carry no docstring of their own (autodoc would print tuple's); say what they
# are for here.
_CONSTANTS = {
    "kdjax.IMPLEMENTATIONS": "Names accepted by the ``implementation=`` argument of every loss "
                             "(``None`` picks one per platform).",
    "kdjax.TAILS": "Names accepted by the ``tail=`` argument of "
                   ":func:`kdjax.sparse_distill_loss`.",
}


def _constant_docstrings(app, what, name, obj, options, lines):
  del app, what, obj, options
  if name in _CONSTANTS:
    lines[:] = [_CONSTANTS[name], ""]


def setup(app):
  app.connect("autodoc-process-docstring", _constant_docstrings)
