"""The ``servekit`` command line, run as a user runs it: a real process on a real store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import servekit as sk
from servekit.cli import main
from servekit.registry import ModelStore


@sk.model
def double(batch: list[float]) -> list[float]:
    return [2 * x for x in batch]


def _store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "models")
    store.save("double", double, metadata={"auc": 0.9})
    store.save("double", double)
    return store


def test_models_list_show_alias_delete(tmp_path: Path, capsys: object) -> None:
    store = _store(tmp_path)
    root = str(store.root)
    assert main(["models", "list", "--store", root]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "double:1" in out and "double:2" in out

    assert main(["models", "alias", "double", "champion", "1", "--store", root]) == 0
    assert store.aliases("double") == {"champion": 1}
    capsys.readouterr()  # type: ignore[attr-defined]

    assert main(["models", "show", "double@champion", "--store", root, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert shown["ref"] == "double:1" and shown["metadata"] == {"auc": 0.9}
    assert shown["aliases"] == ["champion"]

    assert main(["models", "delete", "double:1", "--store", root]) == 1  # aliased: refused
    assert "champion" in capsys.readouterr().err  # type: ignore[attr-defined]
    assert main(["models", "unalias", "double", "champion", "--store", root]) == 0
    assert main(["models", "delete", "double:1", "--store", root]) == 0
    assert [i.version for i in store.versions("double")] == [2]


def test_errors_are_one_line_without_a_traceback(tmp_path: Path) -> None:
    _store(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "servekit", "models", "show", "nope:1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"SERVEKIT_STORE": str(tmp_path / "models"), "PATH": ""},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("servekit: ")
    assert "Traceback" not in result.stderr
    listing = subprocess.run(
        [sys.executable, "-m", "servekit", "models", "list", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"SERVEKIT_STORE": str(tmp_path / "models"), "PATH": ""},
        check=True,
    )
    assert [row["ref"] for row in json.loads(listing.stdout)] == ["double:1", "double:2"]
