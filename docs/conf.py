"""Sphinx configuration of jaxce's documentation site.

Build (the docs extra, ``pip install -c constraints-latest.txt -e ".[docs]"``):

    python -m sphinx -W -b html docs docs/_build/html
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jaxce, installed or not

import jaxce  # noqa: E402

project = "jaxce"
author = "the jaxce authors"
copyright = "the jaxce authors"
release = version = jaxce.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Links such as [the fused loss](guides/fused.md#chunk-sizes) work on GitHub and here.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

# Google-style docstrings; "PyTorch equivalent:" is jaxce's own section.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["PyTorch equivalent"]
# "Returns:\n  The loss: shape ..." reads as a type "The loss"; keep it text, not a reference.
napoleon_use_rtype = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"

# Every cross-reference must resolve (-W makes a broken one fail the build). Names from
# other libraries cannot: there is no network for intersphinx inventories.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|numpy|np|jnp|optax|flax|torch|typing|collections|builtins)(\..*)?"),
    (r"py:.*", r"(int|float|str|bool|tuple|list|dict|object|None|Callable|Sequence|Any)"),
    (r"py:.*", r"(Array|ArrayLike|DTypeLike|Mesh)"),
]

html_theme = "furo"
html_title = f"jaxce {release}"
