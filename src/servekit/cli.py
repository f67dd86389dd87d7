"""The ``servekit`` command line.

::

    servekit models list   [--store DIR] [--json]
    servekit models show   REF [--store DIR] [--json]
    servekit models alias  NAME ALIAS VERSION [--store DIR]
    servekit models unalias NAME ALIAS [--store DIR]
    servekit models delete REF [--force] [--store DIR]

    servekit jobs worker --predictor MODULE:ATTR [--store FILE] [--workers N] [--lease-s S]
                         [--allow-network CIDR ...]
    servekit jobs list   [--store FILE] [--status STATUS] [--limit N] [--json]
    servekit jobs show   ID [--store FILE]
    servekit jobs cancel ID [--store FILE]
    servekit jobs purge  --older-than-s S [--store FILE]

    servekit serve MODULE:ATTR [--host 127.0.0.1] [--port 8000] [--jobs FILE]
                   [--job-workers N] [--max-body-mb N] [--expose-model-errors]
                   [--grace-s S] [--log-level LEVEL] [--timeout-keep-alive S]
                   [--header-timeout-s S]

    servekit batch run --model MODULE:ATTR --input IN --output OUT [--key COL[,COL]]
                       [--columns COL[,COL]] [--passthrough COL[,COL]] [--errors FILE]
                       [--chunk-size N] [--resume] [--overwrite] [--max-error-rate R]
                       [--processes N] [--concurrency N] [--no-progress]

For ``models``, ``--store`` defaults to ``$SERVEKIT_STORE``, else ``./models``; for
``jobs``, to ``$SERVEKIT_JOBS``, else ``./servekit-jobs.sqlite3``. A worker signs
webhooks with the secret in ``$SERVEKIT_WEBHOOK_SECRET`` (no webhooks without it) and
stops on SIGTERM or SIGINT: it stops claiming, lets running jobs finish for
``--grace-s``, and exits. Errors print one line
to stderr and exit with status 2 (usage) or 1 (anything else); no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import ServekitError

__all__ = ["load_target", "main"]


def _store(args: argparse.Namespace) -> Any:
    from .registry import ModelStore  # imported here: only these commands need it

    return ModelStore(args.store)


def _info_dict(info: Any) -> dict[str, Any]:
    return {
        "ref": info.ref,
        "name": info.name,
        "version": info.version,
        "aliases": list(info.aliases),
        "created_at": info.created_at.isoformat(),
        "sha256": info.sha256,
        "size": info.size,
        "metadata": info.metadata,
        "python_version": info.python_version,
        "numpy_version": info.numpy_version,
        "cloudpickle_version": info.cloudpickle_version,
        "servekit_version": info.servekit_version,
        "signature": info.signature,
    }


def _models_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = [info for name in store.names() for info in store.versions(name)]
    if args.json:
        print(json.dumps([_info_dict(info) for info in rows], indent=2))
        return 0
    if not rows:
        print(f"no models in {args.store}")
        return 0
    print(f"{'REF':<32} {'ALIASES':<24} {'CREATED (UTC)':<20} SIZE")
    for info in rows:
        aliases = ",".join(info.aliases) or "-"
        created = info.created_at.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{info.ref:<32} {aliases:<24} {created:<20} {info.size:,}")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    info = _store(args).info(args.ref)
    data = _info_dict(info)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else value
        print(f"{key:<20} {shown}")
    return 0


def _models_alias(args: argparse.Namespace) -> int:
    _store(args).set_alias(args.name, args.alias, args.version)
    print(f"{args.name}@{args.alias} -> {args.name}:{args.version}")
    return 0


def _models_unalias(args: argparse.Namespace) -> int:
    _store(args).remove_alias(args.name, args.alias)
    print(f"removed {args.name}@{args.alias}")
    return 0


def _models_delete(args: argparse.Namespace) -> int:
    _store(args).delete(args.ref, force=args.force)
    print(f"deleted {args.ref}")
    return 0


def load_target(spec: str) -> Any:
    """The object named by ``module:attr`` (``attr`` may be dotted), importing the
    module with the current directory on ``sys.path``, as ``python -m`` would."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"servekit: expected MODULE:ATTR (like app:predictor), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"servekit: cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise SystemExit(f"servekit: {module_name!r} has no attribute {attr!r}") from None
    return value


def _job_store(args: argparse.Namespace) -> Any:
    from .jobs import SQLiteJobStore

    return SQLiteJobStore(args.store)


def _job_line(job: Any) -> str:
    error = "" if job.error is None else f"  {job.error['code']}: {job.error['message']}"
    return f"{job.id}  {job.status.value:<9}  attempts={job.attempts}{error}"


def _jobs_worker(args: argparse.Namespace) -> int:
    from .jobs import JobQueue, Webhooks

    target = load_target(args.predictor)
    secret = os.environ.get("SERVEKIT_WEBHOOK_SECRET")
    webhooks = None
    if secret:
        webhooks = Webhooks(secret=secret, allow_networks=tuple(args.allow_network))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    queue = JobQueue(
        target,
        store=args.store,
        workers=args.workers,
        lease_s=args.lease_s,
        webhooks=webhooks,
    )
    queue.start()
    print(
        f"servekit jobs worker: {args.workers} worker(s) on {args.store} "
        f"(pid {os.getpid()}); SIGTERM or Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    queue.close(grace_s=args.grace_s)
    return 0


def _jobs_list(args: argparse.Namespace) -> int:
    from .jobs import JobStatus, job_dict

    store = _job_store(args)
    try:
        status = None if args.status is None else JobStatus(args.status)
        jobs = store.list(status, args.limit)
    finally:
        store.close()
    if args.json:
        from .jobs import encode_payload

        print(encode_payload([job_dict(job) for job in jobs]))
    else:
        for job in jobs:
            print(_job_line(job))
    return 0


def _jobs_show(args: argparse.Namespace) -> int:
    from .jobs import encode_payload, job_dict

    store = _job_store(args)
    try:
        print(encode_payload(job_dict(store.get(args.id))))
    finally:
        store.close()
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    store = _job_store(args)
    try:
        print(_job_line(store.cancel(args.id)))
    finally:
        store.close()
    return 0


def _jobs_purge(args: argparse.Namespace) -> int:
    store = _job_store(args)
    try:
        print(f"purged {store.purge(args.older_than_s)} finished job(s)")
    finally:
        store.close()
    return 0


def _jobs_parser(commands: Any) -> None:
    jobs = commands.add_parser("jobs", help="run job workers and inspect a job store")
    default = os.environ.get("SERVEKIT_JOBS", "servekit-jobs.sqlite3")
    store_help = "the SQLite job store (default: $SERVEKIT_JOBS, else ./servekit-jobs.sqlite3)"
    actions = jobs.add_subparsers(dest="action", required=True)

    worker = actions.add_parser("worker", help="run jobs from the store until stopped")
    worker.add_argument("--predictor", required=True, help="MODULE:ATTR of a predictor/model")
    worker.add_argument("--store", default=default, help=store_help)
    worker.add_argument("--workers", type=int, default=1, help="runner threads (default 1)")
    worker.add_argument("--lease-s", type=float, default=30.0, help="job lease (default 30)")
    worker.add_argument("--grace-s", type=float, default=30.0, help="drain time on stop")
    worker.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="deliver webhooks to this non-public network too (repeatable)",
    )
    worker.set_defaults(run=_jobs_worker)

    listing = actions.add_parser("list", help="jobs, oldest first")
    listing.add_argument("--store", default=default, help=store_help)
    listing.add_argument("--status", choices=[s.value for s in _job_statuses()])
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_jobs_list)

    for name, run, text in (
        ("show", _jobs_show, "one job as JSON"),
        ("cancel", _jobs_cancel, "cancel a queued or running job"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("id")
        action.add_argument("--store", default=default, help=store_help)
        action.set_defaults(run=run)

    purge = actions.add_parser("purge", help="delete finished jobs older than a retention")
    purge.add_argument("--older-than-s", type=float, required=True)
    purge.add_argument("--store", default=default, help=store_help)
    purge.set_defaults(run=_jobs_purge)


def _names(text: str | None) -> list[str]:
    return [] if not text else [name.strip() for name in text.split(",") if name.strip()]


def _batch_run(args: argparse.Namespace) -> int:
    from ._predictor import Predictor
    from .backends import Processes
    from .batch import run_batch

    target = load_target(args.model)
    predictor: Any = target
    if args.processes:
        if isinstance(target, Predictor):
            raise SystemExit("servekit: --processes needs a model or function, not a Predictor")
        predictor = Predictor(target, backend=Processes(args.processes))
    columns = _names(args.columns)
    try:
        report = run_batch(
            predictor,
            args.input,
            args.output,
            key=_names(args.key),
            columns=columns[0] if len(columns) == 1 else (columns or None),
            passthrough=_names(args.passthrough),
            error_sink=args.errors,
            chunk_size=args.chunk_size,
            max_error_rate=args.max_error_rate,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            concurrency=args.concurrency,
        )
    except (ValueError, TypeError) as exc:  # a bad argument: an unknown suffix, a size
        if isinstance(exc, ServekitError):
            raise
        print(f"servekit: {exc}", file=sys.stderr)
        return 2
    finally:
        if predictor is not target:
            predictor.close()
    print(report)
    return 0


def _batch_parser(commands: Any) -> None:
    batch = commands.add_parser("batch", help="offline batch inference over files")
    actions = batch.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="score an input file into an output file")
    run.add_argument("--model", required=True, help="MODULE:ATTR of a model, function or predictor")
    run.add_argument("--input", required=True, help="a .csv, .tsv, .jsonl or .parquet file")
    run.add_argument("--output", required=True, help="a .jsonl, .csv or .parquet file")
    run.add_argument("--key", help="key column(s) copied to the output, comma-separated")
    run.add_argument("--columns", help="the model input: one column, or several (a dict)")
    run.add_argument("--passthrough", help="columns copied to the output as they are")
    run.add_argument("--errors", help="a file for the failed rows (.jsonl, .csv, .parquet)")
    run.add_argument("--chunk-size", type=int, default=1000, help="input rows per chunk")
    run.add_argument("--resume", action="store_true", help="skip chunks already written")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.add_argument("--max-error-rate", type=float, help="stop above this share of failed rows")
    run.add_argument("--processes", type=int, default=0, help="run the model in N processes")
    run.add_argument(
        "--concurrency", type=int, help="chunks in the model at once (default: one per worker)"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(run=_batch_run)


def _job_store_path(path: str, model: str) -> str:
    """The job store of one model when ``servekit serve --jobs PATH`` serves several:
    the model's name before the suffix (``jobs.sqlite3`` -> ``jobs.NAME.sqlite3``)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model):
        raise SystemExit(
            f"servekit: model name {model!r} cannot name a job store file; "
            "use letters, digits, '.', '_' and '-'"
        )
    root, suffix = os.path.splitext(path)
    return f"{root}.{model}{suffix or '.sqlite3'}"


def _exit_now(message: str, status: int) -> NoReturn:
    """Leave at once, from a signal handler: worker processes are stopped (they would
    be orphaned otherwise), threads are abandoned, nothing else is waited for."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    # SIGKILL, and no waiting: a supervisor thread that saw a worker die would spawn a
    # replacement, and a worker busy in predict() may not heed SIGTERM soon.
    for child in multiprocessing.active_children():
        with contextlib.suppress(ValueError):  # closed: its owner has reaped it already
            child.kill()
    os._exit(status)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise SystemExit(
            'servekit: `servekit serve` runs on uvicorn: pip install "servekit[serve]"'
        ) from None
    from ._predictor import Predictor
    from .transports import Limits, create_asgi_app

    grpc_transport: Any = None  # --grpc-port: a grpc.aio server beside uvicorn, same loop
    if args.grpc_port is not None:
        try:
            from .transports import grpc as grpc_transport
        except ImportError as exc:
            raise SystemExit(f"servekit: {exc}") from None
    target = load_target(args.target)
    if isinstance(target, dict):
        predictors: Any = {
            str(name): p if isinstance(p, Predictor) else Predictor(p, name=str(name))
            for name, p in target.items()
        }
        first = next(iter(predictors.values()))
    else:
        predictors = first = target if isinstance(target, Predictor) else Predictor(target)
    jobs: Any = None
    if args.jobs:
        from .jobs import JobQueue

        if isinstance(predictors, dict) and len(predictors) > 1:
            # One queue per model, each on its own store file: a job row does not name
            # its model, so queues sharing one file would run each other's jobs.
            jobs = {
                name: JobQueue(p, store=_job_store_path(args.jobs, name), workers=args.job_workers)
                for name, p in predictors.items()
            }
        else:
            jobs = JobQueue(first, store=args.jobs, workers=args.job_workers)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20))
    app = create_asgi_app(
        predictors,
        jobs=jobs,
        limits=limits,
        expose_model_errors=args.expose_model_errors,
        grace_s=args.grace_s,
    )

    from ._predictor import PredictorState

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            name = signal.Signals(sig).name
            loaded = all(p.state is PredictorState.RUNNING for p in app.service.predictors.values())
            if not self.started and not loaded:
                # SD-03: a model is still in load(), which cannot be interrupted, and no
                # request was accepted yet: nothing to drain, so stop now.
                _exit_now(f"servekit: {name} while loading the model(s); stopped", 0)
            if self.should_exit:
                # SD-04: a second signal during the drain escalates to a fast exit.
                _exit_now(f"servekit: second signal ({name}) during the drain; exiting now", 1)
            # Readiness flips first: probes see 503 while in-flight requests drain.
            app.service.accepting = False
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)  # lifespan first: the predictors are loaded
            if grpc_transport is not None and self.started:
                try:
                    self.grpc = grpc_transport.create_server(
                        app.service,  # shared: readiness and refusal at shutdown are one
                        host=args.host,
                        port=args.grpc_port,
                        max_message_bytes=limits.max_body_bytes,
                    )
                except OSError as exc:  # the port is taken: stop (drained) and exit 1
                    print(f"servekit: {exc}", file=sys.stderr)
                    self.grpc_failed = self.should_exit = True
                    return
                await self.grpc.start()
                print(f"servekit: gRPC on {args.host}:{self.grpc.port}", file=sys.stderr)

        async def shutdown(self, sockets: Any = None) -> None:
            import asyncio

            # gRPC refuses new RPCs at once and drains its own beside the HTTP ones;
            # the lifespan (in super().shutdown) then drains and closes the predictors.
            grpc_server = getattr(self, "grpc", None)
            stopping = None
            if grpc_server is not None:
                stopping = asyncio.ensure_future(grpc_server.stop(args.grace_s))
            await super().shutdown(sockets)
            if stopping is not None:
                await stopping
            if getattr(self, "grpc_failed", False):
                raise SystemExit(1)

    from .transports._uvicorn import h11_with_head_timeout

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.grace_s,
        # Slow clients (TR-14): an idle kept-alive connection is closed after
        # --timeout-keep-alive, a request head not complete after --header-timeout-s.
        http=h11_with_head_timeout(args.header_timeout_s),
        timeout_keep_alive=args.timeout_keep_alive,
    )
    # uvicorn re-raises the signal that stopped it once it has drained, for the handler
    # that was there before; make that a no-op, so a graceful stop exits with status 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    Server(config).run()
    return 0


def _serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve a model over HTTP (uvicorn)")
    serve.add_argument("target", help="MODULE:ATTR of a predictor, model, function or dict")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--jobs",
        help="a SQLite job store: enables the /jobs routes (several models: one store "
        "per model, FILE's name with .MODEL before the suffix)",
    )
    serve.add_argument("--job-workers", type=int, default=1, help="job runner threads")
    serve.add_argument("--max-body-mb", type=float, default=64.0, help="request body limit")
    serve.add_argument(
        "--expose-model-errors", action="store_true", help="put model messages in responses"
    )
    serve.add_argument("--grace-s", type=float, default=30.0, help="drain time on SIGTERM")
    serve.add_argument("--log-level", default="info", help="uvicorn's log level")
    serve.add_argument(
        "--timeout-keep-alive", type=float, default=5.0, help="close idle connections after S"
    )
    serve.add_argument(
        "--header-timeout-s", type=float, default=10.0, help="time to send a request head"
    )
    serve.add_argument(
        "--grpc-port",
        type=int,
        help="also serve the Open Inference Protocol over gRPC on this port (extra grpc; "
        "messages up to --max-body-mb)",
    )
    serve.set_defaults(run=_serve)


def _job_statuses() -> Any:
    from .jobs import JobStatus

    return JobStatus


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="servekit", description="Embeddable model serving.")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list and manage a model store")
    store_help = "the store's root directory (default: $SERVEKIT_STORE, else ./models)"
    default_store = os.environ.get("SERVEKIT_STORE", "models")
    actions = models.add_subparsers(dest="action", required=True)

    listing = actions.add_parser("list", help="every version of every model")
    listing.add_argument("--store", default=default_store, help=store_help)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_models_list)

    show = actions.add_parser("show", help="one version's manifest: name:3, name@alias, name")
    show.add_argument("ref")
    show.add_argument("--store", default=default_store, help=store_help)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_models_show)

    alias = actions.add_parser("alias", help="point NAME@ALIAS at VERSION")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    alias.add_argument("--store", default=default_store, help=store_help)
    alias.set_defaults(run=_models_alias)

    unalias = actions.add_parser("unalias", help="remove NAME@ALIAS")
    unalias.add_argument("name")
    unalias.add_argument("alias")
    unalias.add_argument("--store", default=default_store, help=store_help)
    unalias.set_defaults(run=_models_unalias)

    delete = actions.add_parser("delete", help="delete one version (name:3)")
    delete.add_argument("ref")
    delete.add_argument("--force", action="store_true", help="even if an alias points at it")
    delete.add_argument("--store", default=default_store, help=store_help)
    delete.set_defaults(run=_models_delete)
    _jobs_parser(commands)
    _batch_parser(commands)
    _serve_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``servekit`` command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except ServekitError as exc:
        print(f"servekit: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":  # pragma: no cover - python -m servekit.cli
    sys.exit(main())
