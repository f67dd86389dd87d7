"""The ``servekit`` command line.

::

    servekit models list   [--store DIR] [--json]
    servekit models show   REF [--store DIR] [--json]
    servekit models alias  NAME ALIAS VERSION [--store DIR]
    servekit models unalias NAME ALIAS [--store DIR]
    servekit models delete REF [--force] [--store DIR]

``--store`` defaults to ``$SERVEKIT_STORE``, else ``./models``. Errors print one line
to stderr and exit with status 2 (usage) or 1 (anything else); no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import ServekitError

__all__ = ["main"]


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
