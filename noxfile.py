"""Development sessions. Plain ``nox`` runs everything except the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

import nox

# `tests` runs last, so that pytest's summary is the closing line of a plain `nox` run
# (CI reads the last test runner's summary; schemathesis prints one of its own).
nox.options.sessions = [
    "lint",
    "typecheck",
    "docs",
    "examples",
    "conformance",
    "dask",
    "ray",
    "clients",
    "fuzz",
    "tests",
]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (async tests on asyncio and trio)."""
    session.install("-e", ".[trio]", *_group("test"))
    # tests/integrations and tests/distributed need heavy extras; each has its own session.
    session.run(
        "pytest",
        "--ignore=tests/integrations",
        "--ignore=tests/distributed",
        "--ignore=tests/fuzz",  # TR-12 needs boofuzz: nox -s fuzz
        *(f"--ignore={test}" for test in CLIENT_TESTS.values()),
        *session.posargs,
    )


# TR-13 with the kserve and MLServer clients: both pin protobuf 6 (the gRPC transport's
# stubs need 7), so they stay out of `tests`; and kserve needs starlette >= 1.3 where
# MLServer needs < 0.47, so each gets a virtualenv of its own.
CLIENT_TESTS = {
    "kserve": "tests/transports/test_kserve_client.py",
    "mlserver": "tests/transports/test_mlserver_codecs.py",
}


@nox.session
@nox.parametrize("client", list(CLIENT_TESTS))
def clients(session: nox.Session, client: str) -> None:
    """TR-13: the kserve and MLServer clients against a real `servekit serve`."""
    session.install("-e", ".[serve]", client, "pytest", "pytest-timeout", "httpx", "anyio")
    session.run("pytest", CLIENT_TESTS[client], *session.posargs)


@nox.session
def dask(session: nox.Session) -> None:
    """DaskRunner on a real 2-worker LocalCluster (not in the default run)."""
    session.install("-e", ".[dask,parquet]", *_group("test"))
    tests = [
        "tests/distributed/test_partitions.py",
        "tests/distributed/test_dask.py",
        "tests/distributed/test_dask_by_value.py",
        "tests/distributed/test_sql_ranges.py",
    ]
    session.run("pytest", *tests, *session.posargs)


@nox.session
def ray(session: nox.Session) -> None:
    """RayRunner on a local Ray with 2 CPUs (not in the default run)."""
    session.install("-e", ".[ray,parquet]", *_group("test"))
    tests = [
        "tests/distributed/test_partitions.py",
        "tests/distributed/test_ray.py",
        "tests/distributed/test_ray_by_value.py",
    ]
    session.run("pytest", *tests, *session.posargs)


@nox.session
def bench_distributed(session: nox.Session) -> None:
    """DaskRunner and RayRunner against a local run and a hand-written dask.dataframe
    pipeline (benchmarks/distributed/, which `bench` does not run: it needs both extras)."""
    session.install("-e", ".[dask,ray,parquet]", "dask[dataframe]")
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    session.run("python", "benchmarks/distributed/run.py", env={**os.environ, **env})


@nox.session
def mlflow(session: nox.Session) -> None:
    """The MLflow integration against a local sqlite registry (not in the default run)."""
    session.install("-e", ".[mlflow]", *_group("test"))
    session.run("pytest", "tests/integrations", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/."""
    session.install("-e", ".[trio]", *_group("typecheck"))
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx + MyST docs with warnings as errors."""
    session.install("-e", ".[grpc]", *_group("docs"))  # autodoc imports the gRPC transport
    session.run(
        "sphinx-build", "-W", "--keep-going", "-n", "-b", "html", "docs", "docs/_build/html"
    )


@nox.session
def examples(session: nox.Session) -> None:
    """Run every script in examples/."""
    # The framework examples need the frameworks they show (not servekit extras).
    session.install("-e", ".[trio,parquet,serve,fastapi,grpc]", "httpx", "flask", "django")
    for script in sorted((ROOT / "examples").glob("*.py")):
        session.log(f"running {script.name}")
        session.run("python", str(script))


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks in benchmarks/ and print ratios measured in one run."""
    session.install("-e", ".[trio,parquet,serve,grpc]", "starlette")
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    selected = [s for s in scripts if not session.posargs or s.stem in session.posargs]
    for script in selected:
        if script.name.startswith("_"):
            continue
        session.log(f"running {script.name}")
        session.run("python", str(script), env={**os.environ, **env})


# The generated gRPC modules depend on the versions that generated them (the protobuf
# gencode checks its runtime, the grpc stub checks grpcio): bump this pin, the `grpc`
# extra's lower bounds and the committed stubs together.
GRPC_TOOLS = "grpcio-tools==1.85.1"


@nox.session
def grpc_stubs(session: nox.Session) -> None:
    """Regenerate the committed gRPC stubs of servekit.transports.grpc from its .proto
    (the Open Inference Protocol's), with a pinned grpcio-tools: the output is the same
    on every machine."""
    session.install(GRPC_TOOLS)
    proto = "servekit/transports/grpc/_proto/open_inference_grpc.proto"
    session.chdir(ROOT / "src")
    session.run(
        "python",
        "-m",
        "grpc_tools.protoc",
        "-I.",
        "--python_out=.",
        "--pyi_out=.",
        "--grpc_python_out=.",
        proto,
    )


@nox.session
def conformance(session: nox.Session) -> None:
    """TR-11: schemathesis over the Open Inference Protocol REST spec, against a real
    `servekit serve` on 127.0.0.1 (0 failures; about two minutes)."""
    session.install("-e", ".[serve]", "schemathesis>=4")
    session.run("python", "tests/conformance/run_schemathesis.py")


@nox.session
def fuzz(session: nox.Session) -> None:
    """TR-12: boofuzz over the request line, headers and bodies of a real `servekit serve`
    on 127.0.0.1 (0 fail steps, live afterwards; about two minutes, at most
    SERVEKIT_FUZZ_MAX_S seconds of fuzzing)."""
    session.install("-e", ".[serve]", "boofuzz", "pytest", "pytest-timeout")
    session.run("pytest", "tests/fuzz", *session.posargs)
