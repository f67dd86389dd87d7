"""Sphinx configuration for the servekit documentation (Sphinx + MyST, built with -W -n)."""

from __future__ import annotations

import re
from typing import Any

import servekit

project = "servekit"
author = "servekit developers"
copyright = "servekit developers"
release = servekit.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
# No intersphinx: the docs build must not need the network.

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"servekit {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True

nitpicky = True
# Names that cannot resolve without intersphinx: the standard library, third-party
# packages and typing internals. servekit's own names must always resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"(typing|typing_extensions|collections\.abc|types)\..*"),
    (r"py:.*", r"(threading|multiprocessing|asyncio)\..*"),
    (r"py:class", r"(os\.PathLike|pathlib\.Path|datetime\.datetime)"),
    (r"py:.*", r"(numpy|pydantic|pydantic_core|anyio|trio)(\..*)?"),
    # Builtin bases shown by :show-inheritance: (InvalidInput is a ValueError, ...).
    (r"py:(class|exc)", r"(Exception|ValueError|TimeoutError)"),
    # The type variables of the generic Model and Predictor: parameters, not objects.
    (r"py:.*", r"servekit\.(_\w+\.)*(In|Out)"),
    # Backend.submit takes a Task, which is private in this release (not in __all__).
    (r"py:class", r"servekit\.backends\._base\.Task"),
]

# servekit's classes live in private modules (servekit._predictor, ...) and are
# documented under their public names (servekit.Predictor, ...). Type hints name the
# private path; send those references to the public name.
_PRIVATE = re.compile(r"^servekit\.(?:_\w+|backends(?:\._\w+)?|errors|metrics)\.(\w+)$")


# The model store's classes live in servekit.registry._store and ._artifact and are
# documented as servekit.registry.X; their docstrings also name the registry's errors
# (documented as servekit.X) and its functions without a module.
_PRIVATE_REGISTRY = re.compile(r"^servekit\.registry\._\w+\.(\w+)$")
_REGISTRY_MODULES = {"servekit", "servekit.errors", "servekit.registry"}


def _public_name(node: Any) -> str | None:
    """The public name a reference to servekit's private path (or bare name) means."""
    import servekit.registry

    target = node.get("reftarget", "")
    match = _PRIVATE.match(target)
    if match is not None and match.group(1) in servekit.__all__:
        return f"servekit.{match.group(1)}"
    match = _PRIVATE_REGISTRY.match(target)
    if match is not None and match.group(1) in servekit.registry.__all__:
        target = match.group(1)
    elif "." in target or node.get("py:module") not in _REGISTRY_MODULES:
        return None
    if target in servekit.__all__:
        return f"servekit.{target}"
    if target in servekit.registry.__all__:
        return f"servekit.registry.{target}"
    return None


def _public_target(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    if node.get("refdomain") != "py":
        return None
    public = _public_name(node)
    if public is None:
        return None
    domain = env.get_domain("py")
    node["reftarget"] = public
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], public, node, contnode
    )


# servekit's attribute and property docstrings are prose ("The predictor's name
# (default: the model's name)."), but napoleon reads "text: more" in them as
# "type: description". Keep napoleon for functions and classes, and give attributes
# and properties their docstrings back untouched: save them before napoleon (priority
# 500) runs and restore them after.
_SAVED: dict[str, list[str]] = {}
_ATTRIBUTE_KINDS = {"attribute", "property", "data"}


def _save_attribute_doc(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if what in _ATTRIBUTE_KINDS:
        _SAVED[name] = list(lines)


def _restore_attribute_doc(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if what in _ATTRIBUTE_KINDS and name in _SAVED:
        lines[:] = _SAVED.pop(name)


def setup(app: Any) -> None:
    app.connect("missing-reference", _public_target)
    app.connect("autodoc-process-docstring", _save_attribute_doc, priority=400)
    app.connect("autodoc-process-docstring", _restore_attribute_doc, priority=600)
