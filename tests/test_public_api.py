from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

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
        "'tqdm', 'prometheus_client', 'opentelemetry', 'psutil', 'hypothesis'}); "
        "print(bad, threading.active_count() - before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[] 0"


def test_metrics_exporters_import_their_library_only_when_used() -> None:
    # The modules that export to prometheus_client and OpenTelemetry import them inside
    # the functions that need them: importing servekit's transports, metrics and
    # integrations pulls in neither.
    code = (
        "import sys; import servekit.transports, servekit.metrics, servekit.jobs; "
        "import servekit.integrations.prometheus, servekit.integrations.opentelemetry; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'prometheus_client', 'opentelemetry'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize(
    ("blocked", "call", "extra"),
    [
        ("prometheus_client", "register_prometheus", "servekit[prometheus]"),
        ("opentelemetry", "register_opentelemetry", "servekit[otel]"),
    ],
)
def test_a_missing_exporter_library_names_its_extra(blocked: str, call: str, extra: str) -> None:
    code = (
        f"import sys; sys.modules[{blocked!r}] = None; import servekit as sk; "
        "from servekit import metrics; "
        "p = sk.Predictor(lambda xs: xs)\n"
        f"try:\n    metrics.{call}(p)\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert f'pip install "{extra}"' in out


def test_docstring_examples_run() -> None:
    import doctest

    import servekit._signature
    import servekit.errors
    import servekit.metrics

    for module in (servekit.errors, servekit._signature, servekit.metrics):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__
