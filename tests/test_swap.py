"""Hot swap under load (rows ML-02, ML-03, ML-04 of the reliability catalog)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import servekit as sk


class Tagged(sk.Model[Any, Any]):
    """Answers (tag, x); records the tags of each batch it ran (in this process)."""

    def __init__(self, tag: str, *, fail_load: bool = False) -> None:
        self.tag = tag
        self.fail_load = fail_load

    def load(self) -> None:
        if self.fail_load:
            raise RuntimeError(f"{self.tag} cannot load")
        self.pid = os.getpid()

    def predict(self, batch: list[Any]) -> list[Any]:
        time.sleep(0.001)
        return [(self.tag, x) for x in batch]


BACKENDS: dict[str, Callable[[], sk.Backend]] = {
    "inline": sk.Inline,
    "threads": lambda: sk.Threads(2),
    "processes": lambda: sk.Processes(2),
}


def _under_load(
    predictor: sk.Predictor[Any, Any], action: Callable[[], Any], threads: int = 6
) -> tuple[list[list[Any]], list[BaseException], Any]:
    """Call predict from several threads while ``action`` runs; collect every answer."""
    stop = threading.Event()
    answers: list[list[Any]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def client(index: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                answers[index].append(predictor.predict(i))
            except BaseException as exc:  # every failure is a test failure
                errors.append(exc)
            i += 1

    with ThreadPoolExecutor(threads) as pool:
        for index in range(threads):
            pool.submit(client, index)
        time.sleep(0.1)
        try:
            result: Any = action()
        except BaseException as exc:
            result = exc
        time.sleep(0.1)
        stop.set()
    return answers, errors, result


@pytest.mark.parametrize("batched", [False, True], ids=["direct", "batcher"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_ml03_swap_under_load_drops_nothing_and_never_goes_back(
    backend: str, batched: bool
) -> None:
    batcher = sk.Batcher(max_batch_size=8) if batched else None
    with sk.Predictor(Tagged("v1"), backend=BACKENDS[backend](), batcher=batcher) as p:
        old_pids = set(getattr(p.backend, "worker_pids", list)())
        answers, errors, result = _under_load(p, lambda: p.swap(Tagged("v2")))
        assert result is None
        assert errors == []
        for thread_answers in answers:
            tags = [tag for tag, _ in thread_answers]
            assert tags, "every client was served"
            # Once a client has seen v2 it never sees v1 again: the switch is atomic.
            first_v2 = tags.index("v2") if "v2" in tags else len(tags)
            assert set(tags[:first_v2]) <= {"v1"} and set(tags[first_v2:]) <= {"v2"}
        assert any("v2" in [t for t, _ in a] for a in answers)
        assert p.predict(1) == ("v2", 1)
        assert p.model.tag == "v2"  # type: ignore[attr-defined]
        if backend == "processes":
            assert not old_pids & set(p.backend.worker_pids())  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_ml02_a_failed_load_leaves_the_old_model_serving(backend: str) -> None:
    with sk.Predictor(Tagged("v1"), backend=BACKENDS[backend]()) as p:
        answers, errors, result = _under_load(p, lambda: p.swap(Tagged("v2", fail_load=True)))
        assert isinstance(result, sk.ModelLoadError)
        assert "v2 cannot load" in str(result)
        assert errors == []
        assert {tag for a in answers for tag, _ in a} == {"v1"}
        assert p.predict(5) == ("v1", 5)


def test_ml04_requests_running_on_the_old_model_finish_there() -> None:
    release = threading.Event()

    class Held(Tagged):
        def predict(self, batch: list[Any]) -> list[Any]:
            release.wait()
            return super().predict(batch)

    with sk.Predictor(Held("v1"), backend=sk.Threads(1)) as p, ThreadPoolExecutor(2) as pool:
        running = pool.submit(p.predict, "old")
        while not p.statistics().in_flight:
            time.sleep(0.001)
        swapping = pool.submit(p.swap, Tagged("v2"))
        while p.model.tag != "v2":  # type: ignore[attr-defined]
            time.sleep(0.001)
        assert p.predict("new") == ("v2", "new")  # new requests go to v2 at once
        assert not swapping.done()  # the old back end is still draining
        release.set()
        assert running.result(timeout=5) == ("v1", "old")
        swapping.result(timeout=5)
    threads = [t.name for t in threading.enumerate() if t.name.startswith("servekit-")]
    assert threads == []


@pytest.mark.anyio
async def test_aswap_on_both_loops() -> None:
    async with sk.Predictor(Tagged("v1"), backend=sk.Threads(1)) as p:
        assert await p.apredict(1) == ("v1", 1)
        await p.aswap(Tagged("v2"))
        assert await p.apredict(1) == ("v2", 1)


def test_swap_to_a_function_and_the_new_signature() -> None:
    def ints(batch: list[int]) -> list[int]:
        return [x + 1 for x in batch]

    with sk.Predictor(Tagged("v1")) as p:
        p.swap(ints)
        assert p.predict("41") == 42  # the new signature validates and converts
        with pytest.raises(sk.InvalidInput):
            p.predict("forty-one")


def test_swap_to_a_store_reference_records_the_version(tmp_path: Any) -> None:
    from servekit.registry import ModelStore

    store = ModelStore(tmp_path)
    store.save("tagged", Tagged("v1"))
    store.save("tagged", Tagged("v2"))
    store.set_alias("tagged", "champion", 1)
    with sk.Predictor(store.load("tagged@champion"), version="tagged:1") as p:
        assert p.version == "tagged:1"
        store.set_alias("tagged", "champion", 2)
        p.swap("tagged@champion", store=store)
        assert p.version == "tagged:2"
        assert p.predict(1) == ("v2", 1)
        with pytest.raises(TypeError, match="needs store"):
            p.swap("tagged@champion")


@pytest.mark.parametrize("batched", [False, True], ids=["direct", "batcher"])
@pytest.mark.parametrize("backend", ["inline", "threads"])
def test_each_result_reports_the_version_that_produced_it(backend: str, batched: bool) -> None:
    batcher = sk.Batcher(max_batch_size=8) if batched else None
    with sk.Predictor(
        Tagged("v1"), backend=BACKENDS[backend](), batcher=batcher, version="v1"
    ) as p:
        stop = threading.Event()
        pairs: list[tuple[Any, Any]] = []

        def client() -> None:
            i = 0
            while not stop.is_set():
                pairs.append(p.predict_with_version(i))
                i += 1

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(client)
            time.sleep(0.05)
            p.swap(Tagged("v2"), version="v2")
            time.sleep(0.05)
            stop.set()
    assert {version for _, version in pairs} == {"v1", "v2"}
    assert all(output[0] == version for output, version in pairs)


@pytest.mark.anyio
async def test_apredict_with_version() -> None:
    async with sk.Predictor(Tagged("v1"), version="v1", batcher=sk.Batcher()) as p:
        assert await p.apredict_with_version(3) == (("v1", 3), "v1")
        await p.aswap(Tagged("v2"), version="v2")
        assert await p.apredict_with_version(3) == (("v2", 3), "v2")
