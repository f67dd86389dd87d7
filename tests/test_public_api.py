from __future__ import annotations

import inspect
import subprocess
import sys

import servekit
import servekit.testing


def test_all_is_sorted_and_every_listed_name_exists() -> None:
    assert servekit.__all__ == sorted(servekit.__all__)
    for name in servekit.__all__:
        assert hasattr(servekit, name), name


def test_every_public_name_is_listed() -> None:
    public = {
        name
        for name, value in vars(servekit).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(servekit.__all__)


def _public_members(obj: object) -> list[tuple[str, object]]:
    members = []
    for name, value in vars(obj).items():
        if name.startswith("_"):
            continue
        if inspect.isfunction(value) or isinstance(value, property | type):
            members.append((name, value))
    return members


def test_every_public_name_and_method_has_a_docstring() -> None:
    missing = []
    for module in (servekit, servekit.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.getdoc(obj):
                missing.append(name)
            if inspect.isclass(obj):
                for member, value in _public_members(obj):
                    if not getattr(value, "__doc__", None):
                        missing.append(f"{name}.{member}")
    assert missing == []


def test_import_has_no_optional_dependency_and_no_side_effect() -> None:
    code = (
        "import sys, threading; before = threading.active_count(); import servekit; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'trio', 'pandas', 'pyarrow', 'uvicorn', 'fastapi', 'starlette', 'dask', 'ray', "
        "'tqdm', 'prometheus_client', 'psutil', 'hypothesis'}); "
        "print(bad, threading.active_count() - before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[] 0"


def test_docstring_examples_run() -> None:
    import doctest

    import servekit._signature
    import servekit.errors
    import servekit.metrics

    for module in (servekit.errors, servekit._signature, servekit.metrics):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__
