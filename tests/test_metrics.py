"""servekit.metrics: histograms, the families collected from live state, and the three
exports (text, prometheus_client, OpenTelemetry) agreeing series for series."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import servekit as sk
from servekit.jobs import (
    JobQueue,
    JobStatus,
    MemoryJobStore,
    SQLiteJobStore,
    Webhooks,
    generate_secret,
)
from servekit.metrics import (
    DURATION_BUCKETS_S,
    FAMILIES,
    Histogram,
    LatencyWindow,
    collect,
    register_opentelemetry,
    register_prometheus,
    render_text,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def double(xs: list[Any]) -> list[Any]:
    return [x * 2 for x in xs]


@sk.model(per_item=True)
def picky(x: int) -> int:
    if x == 13:
        raise ValueError("unlucky")
    return x


def parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every series of a text exposition: (sample name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue  # prometheus_client's own creation times; servekit has none
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(series: dict[Any, float], name: str, **labels: str) -> float:
    return series[(name, tuple(sorted(labels.items())))]


# --- in-process measurements -----------------------------------------------------------


def test_latency_window_keeps_an_all_time_histogram_beyond_its_window() -> None:
    window = LatencyWindow(size=4)
    observations = [0.0002, 0.003, 0.003, 0.7, 0.0001, 400.0]
    for v in observations:
        window.record(v)
    summary = window.summary()
    h = summary.histogram
    assert summary.count == h.count == 6
    assert h.sum == pytest.approx(sum(observations))
    assert h.bounds == DURATION_BUCKETS_S
    by_bound = dict(zip(h.bounds, h.counts, strict=True))
    assert by_bound[0.0001] == 1  # le is inclusive
    assert by_bound[0.00025] == 2
    assert by_bound[0.005] == 4
    assert by_bound[1.0] == 5
    assert by_bound[300.0] == 5  # 400 s is only in +Inf (count)
    assert list(h.counts) == sorted(h.counts)  # cumulative
    assert summary.max_s == 400.0  # the window holds the last four only
    assert summary.p50_s in (0.003, 0.7)


@given(
    st.integers(1, 9),
    st.lists(st.tuples(st.floats(0, 1000, allow_nan=False), st.booleans()), max_size=60),
)
def test_latency_window_histogram_matches_a_direct_count(size: int, steps: Any) -> None:
    # The window buckets its observations in bulk (on wrap and on summary); whatever
    # the interleaving, the histogram equals one made by counting each observation.
    window = LatencyWindow(size=size)
    seen: list[float] = []
    for v, look in steps:
        window.record(v)
        seen.append(v)
        if look:
            window.summary()
    h = window.summary().histogram
    expected = [sum(1 for x in seen if x <= bound) for bound in DURATION_BUCKETS_S]
    assert list(h.counts) == expected
    assert h.count == len(seen)
    assert h.sum == pytest.approx(sum(seen))


@given(
    st.integers(1, 9),
    st.lists(
        st.tuples(st.lists(st.floats(0, 1000, allow_nan=False), max_size=12), st.booleans()),
        max_size=30,
    ),
)
def test_latency_window_record_many_equals_recording_one_by_one(size: int, steps: Any) -> None:
    # The batcher records a batch's queue waits with one call; the window must end up
    # exactly as if they had been recorded one at a time (ring, histogram, count).
    bulk, single = LatencyWindow(size=size), LatencyWindow(size=size)
    for values, look in steps:
        bulk.record_many(values)
        for v in values:
            single.record(v)
        if look:
            _same_summary(bulk, single)
    _same_summary(bulk, single)


def _same_summary(a: LatencyWindow, b: LatencyWindow) -> None:
    x, y = a.summary(), b.summary()
    # The histogram's sum is added up in bulk, in another order: equal but for rounding.
    assert x.histogram.sum == pytest.approx(y.histogram.sum)
    assert dataclasses.replace(x, histogram=None) == dataclasses.replace(y, histogram=None)
    assert x.histogram.counts == y.histogram.counts
    assert x.histogram.count == y.histogram.count


def test_histogram_counts_from_many_threads_without_losing_any() -> None:
    h = Histogram((0.5, 1.0))

    def work() -> None:
        for i in range(2000):
            h.observe(0.25 if i % 2 else 0.75)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = h.snapshot()
    assert snap.count == 8000
    assert snap.counts == (4000, 8000)
    assert snap.sum == pytest.approx(4000 * 0.25 + 4000 * 0.75)
    with pytest.raises(ValueError, match="increase strictly"):
        Histogram((1.0, 0.5))


# --- families from live state ----------------------------------------------------------


def test_predictor_and_batcher_families_after_real_traffic() -> None:
    batched = sk.Predictor(double, name="batched", batcher=sk.Batcher(max_batch_size=4))
    plain = sk.Predictor(picky, name="plain")
    with batched, plain:
        for x in range(5):
            assert batched.predict(x) == 2 * x
        assert batched.predict_many([1, 2, 3]) == [2, 4, 6]
        with pytest.raises(sk.ModelError):
            plain.predict(13)
        plain.predict(1)
        series = parsed(render_text(collect({"batched": batched, "plain": plain})))
    assert value(series, "servekit_predictions_total", model="batched", outcome="succeeded") == 8
    assert value(series, "servekit_predictions_total", model="plain", outcome="failed") == 1
    assert value(series, "servekit_predictions_total", model="plain", outcome="succeeded") == 1
    # One observation per call: five predict calls and one predict_many.
    assert value(series, "servekit_request_duration_seconds_count", model="batched") == 6
    assert (
        value(series, "servekit_request_duration_seconds_bucket", model="batched", le="+Inf") == 6
    )
    assert value(series, "servekit_request_duration_seconds_sum", model="batched") > 0
    assert value(series, "servekit_model_ready", model="plain") == 1
    assert value(series, "servekit_batch_items_total", model="batched", outcome="succeeded") == 8
    batches = value(series, "servekit_batches_total", model="batched")
    assert value(series, "servekit_batch_size_items_count", model="batched") == batches
    assert value(series, "servekit_batch_size_items_sum", model="batched") == 8
    assert value(series, "servekit_queue_wait_seconds_count", model="batched") == 8
    assert value(series, "servekit_batch_duration_seconds_count", model="batched") == batches
    assert ("servekit_batches_total", (("model", "plain"),)) not in series  # no batcher
    info = [k for k in series if k[0] == "servekit_model_info"]
    assert {dict(labels)["model"] for _, labels in info} == {"batched", "plain"}
    assert "servekit_ready" not in {k[0] for k in series}  # only a server has readiness


def test_rejected_items_are_counted() -> None:
    release = threading.Event()

    def blocked(xs: list[Any]) -> list[Any]:
        release.wait(10)
        return xs

    batcher = sk.Batcher(max_batch_size=1, max_queue=2)
    predictor = sk.Predictor(blocked, backend=sk.Threads(1), batcher=batcher, name="m")
    errors: list[BaseException] = []

    def call(x: int) -> None:
        try:
            predictor.predict(x, timeout_s=10)
        except sk.Overloaded as exc:
            errors.append(exc)

    with predictor:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(errors) < 5 and time.monotonic() < deadline:  # 1 running + 2 queued
            time.sleep(0.01)
        release.set()
        for t in threads:
            t.join(10)
        series = parsed(render_text(collect(predictor)))
    assert len(errors) == 5
    assert value(series, "servekit_batch_items_total", model="m", outcome="rejected") == 5
    assert value(series, "servekit_batch_items_total", model="m", outcome="succeeded") == 3
    assert value(series, "servekit_predictions_total", model="m", outcome="failed") == 5


def _job_queue_traffic(store: Any) -> JobQueue:
    """A queue after 4 jobs: 3 succeeded, 1 failed; then 2 more submitted and one of them
    cancelled while queued (workers=0 on a second queue over the same store)."""
    queue = JobQueue(sk.Predictor(picky, name="jobs"), store=store, workers=2)
    with queue:
        ids = [queue.submit(x).id for x in (1, 2, 13, 4)]
        for id in ids:
            queue.wait(id, timeout_s=30)
    return queue


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_job_families_count_submitted_finished_and_queue_depth(kind: str, tmp_path: Path) -> None:
    store = MemoryJobStore() if kind == "memory" else SQLiteJobStore(tmp_path / "jobs.db")
    try:
        queue = _job_queue_traffic(store)
        # A submit-only queue on the same store: two more jobs, one cancelled queued.
        idle = JobQueue(None, store=store, workers=0)
        waiting = idle.submit(5)
        idle.submit(6)
        idle.cancel(waiting.id)
        again = idle.submit(7, idempotency_key="k")
        assert idle.submit(7, idempotency_key="k").id == again.id  # not a new job
        stats = queue.statistics()
        series = parsed(render_text(collect(queue)))
    finally:
        store.close()
    assert stats.model == "jobs"
    assert value(series, "servekit_jobs_submitted_total", model="jobs") == 7
    assert value(series, "servekit_jobs_finished_total", model="jobs", status="succeeded") == 3
    assert value(series, "servekit_jobs_finished_total", model="jobs", status="failed") == 1
    assert value(series, "servekit_jobs_finished_total", model="jobs", status="cancelled") == 1
    assert value(series, "servekit_jobs_finished_total", model="jobs", status="expired") == 0
    assert value(series, "servekit_job_retries_total", model="jobs") == 0
    assert value(series, "servekit_jobs", model="jobs", status="queued") == 2
    assert value(series, "servekit_jobs", model="jobs", status="succeeded") == 3
    assert value(series, "servekit_jobs", model="jobs", status="cancelled") == 1
    assert value(series, "servekit_jobs", model="jobs", status="running") == 0
    assert value(series, "servekit_job_duration_seconds_count", model="jobs") == 4
    assert "servekit_webhook_deliveries_total" not in {k[0] for k in series}


def test_retries_and_expiry_are_counted_where_the_store_applies_them() -> None:
    attempts = {"n": 0}

    def flaky(xs: list[Any]) -> list[Any]:
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise sk.RetryableError("try again")
        return xs

    skew = [0.0]  # store time runs with the real clock, plus a jump past the TTL
    store = MemoryJobStore(clock=lambda: time.time() + skew[0])
    queue = JobQueue(
        sk.Predictor(flaky, name="f"), store=store, retry_backoff_s=0.001, max_retry_backoff_s=0.001
    )
    try:
        # A job that waits past its queue TTL: expired by the next claim's sweep.
        stale = store.submit("old", ttl_s=5)
        skew[0] += 10
        with queue:
            job = queue.submit(1)
            done = queue.wait(job.id, timeout_s=30)
        assert done.status is JobStatus.SUCCEEDED, done
        assert store.get(stale.id).status is JobStatus.EXPIRED
        stats = queue.statistics()
    finally:
        store.close()
    assert stats.retries == 2
    assert stats.finished["succeeded"] == 1
    assert stats.finished["expired"] == 1
    assert stats.submitted == 2


def test_sqlite_counts_only_committed_writes(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    try:
        job = store.submit({"x": 1})
        [claimed] = store.claim("w", lease_s=30)
        # A result that is not JSON fails its operation: rolled back, not counted.
        with pytest.raises(sk.InvalidJobPayload):
            store.complete(claimed.id, "w", object())
        assert store.statistics().finished["succeeded"] == 0
        assert store.complete(job.id, "w", {"ok": True})
        assert store.statistics().finished["succeeded"] == 1
        assert store.count_by_status()[JobStatus.SUCCEEDED] == 1
        # A second store on the file sees the rows, not this process's counters.
        other = SQLiteJobStore(tmp_path / "jobs.db")
        try:
            assert other.count_by_status()[JobStatus.SUCCEEDED] == 1
            assert other.statistics().submitted == 0
        finally:
            other.close()
    finally:
        store.close()


def test_count_by_status_uses_the_status_index(tmp_path: Path) -> None:
    import sqlite3

    store = SQLiteJobStore(tmp_path / "jobs.db")
    store.close()
    conn = sqlite3.connect(tmp_path / "jobs.db")
    try:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT status, count(*) FROM jobs GROUP BY status"
        ).fetchall()
    finally:
        conn.close()
    text = " ".join(str(row[-1]) for row in plan)
    assert "COVERING INDEX jobs_by_status" in text, text


def test_webhook_deliveries_are_counted_by_outcome() -> None:
    import http.server

    hits: list[int] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            hits.append(1)
            self.send_response(500 if len(hits) == 1 else 204)  # fail once, then accept
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    hooks = Webhooks(generate_secret(), allow_networks=("127.0.0.1/32",), backoff_s=0.01)
    queue = JobQueue(sk.Predictor(double, name="w"), store=MemoryJobStore(), webhooks=hooks)
    try:
        with queue:
            url = f"http://127.0.0.1:{server.server_address[1]}/hook"
            job = queue.submit(1, webhook=url)
            queue.wait(job.id, timeout_s=30)
            deadline = time.monotonic() + 20
            while queue.statistics().webhooks["delivered"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            stats = queue.statistics()
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    assert stats.webhooks == {"delivered": 1, "retrying": 1, "failed": 0}
    series = parsed(render_text(collect(queue)))
    assert value(series, "servekit_webhook_deliveries_total", model="w", outcome="retrying") == 1


def test_collect_refuses_what_it_cannot_read() -> None:
    with pytest.raises(TypeError, match="metrics come from"):
        collect(42)
    with pytest.raises(TypeError, match="neither a Predictor nor a JobQueue"):
        collect({"x": object()})


# --- the exports agree ---------------------------------------------------------------


def _traffic() -> tuple[sk.Predictor[Any, Any], sk.Predictor[Any, Any], JobQueue]:
    batched = sk.Predictor(double, name="batched", batcher=sk.Batcher(max_batch_size=4))
    plain = sk.Predictor(picky, name="plain")
    for x in range(6):
        batched.predict(x)
    with pytest.raises(sk.ModelError):
        plain.predict(13)
    queue = _job_queue_traffic(MemoryJobStore())
    return batched, plain, queue


def test_prometheus_client_collector_gives_the_same_series_as_the_text() -> None:
    batched, plain, queue = _traffic()
    try:
        source = [{"batched": batched, "plain": plain}, queue]
        registry = CollectorRegistry()
        collector = register_prometheus(source, registry=registry)
        from_client = generate_latest(registry).decode()
        ours = render_text(collect(source))
        theirs_series, our_series = parsed(from_client), parsed(ours)
        clocked = ("servekit_batcher_utilisation_ratio", (("model", "batched"),))
        assert 0 < theirs_series.pop(clocked) < 1 and 0 < our_series.pop(clocked) < 1
        assert theirs_series == our_series  # the rest is exactly alike
        assert len(our_series) > 100
        # Same types and help texts, family by family.
        theirs = {
            f.name: (f.type, f.documentation) for f in text_string_to_metric_families(from_client)
        }
        mine = {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(ours)}
        assert theirs == mine
        # Live: a scrape after more traffic shows it, with nothing re-registered.
        batched.predict(100)
        again = parsed(generate_latest(registry).decode())
        assert value(again, "servekit_predictions_total", model="batched", outcome="succeeded") == 7
        registry.unregister(collector)
        assert generate_latest(registry) == b""
        # Registering twice on one registry is refused as duplicated series.
        register_prometheus(batched, registry=registry)
        with pytest.raises(ValueError, match="Duplicated"):
            register_prometheus(batched, registry=registry)
    finally:
        batched.close()
        plain.close()


def test_opentelemetry_instruments_read_the_same_values() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    batched, plain, queue = _traffic()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        source = [{"batched": batched, "plain": plain}, queue]
        register_opentelemetry(source, meter_provider=provider)
        calls = {"n": 0}
        import servekit.integrations.opentelemetry as otel

        real = otel._collect

        def counting(*args: Any) -> Any:
            calls["n"] += 1
            return real(*args)

        otel._collect = counting  # type: ignore[assignment]
        try:
            first = _otel_points(reader)
            batched.predict(100)
            second = _otel_points(reader)
        finally:
            otel._collect = real  # type: ignore[assignment]
        assert calls["n"] == 2  # one read of the state per collection, for every instrument
        text = parsed(render_text(collect(source)))
    finally:
        provider.shutdown()
        batched.close()
        plain.close()
    key = ("servekit_predictions", (("model", "batched"), ("outcome", "succeeded")))
    assert first[key] == 6
    assert second[key] == 7
    # Every series of the text but the buckets is an OpenTelemetry point of equal value
    # (counters without _total; a histogram's _count and _sum are counters of their own).
    assert len(text) > 50
    for (name, labels), v in text.items():
        if name.endswith("_bucket") or name == "servekit_batcher_utilisation_ratio":
            continue  # (utilisation moves with the clock)
        otel_name = name.removesuffix("_total")
        assert second[(otel_name, labels)] == pytest.approx(v), (otel_name, labels)
    units = {m.name: m.unit for m in _otel_metrics(reader)}
    assert units["servekit_request_duration_seconds_sum"] == "s"
    assert units["servekit_jobs"] == "{job}"


def _otel_metrics(reader: Any) -> list[Any]:
    data = reader.get_metrics_data()
    return [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]


def _otel_points(reader: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for metric in _otel_metrics(reader):
        for point in metric.data.data_points:
            out[(metric.name, tuple(sorted(point.attributes.items())))] = point.value
    return out


# --- names and docs ----------------------------------------------------------------------


def test_names_follow_the_prometheus_conventions() -> None:
    for name, spec in FAMILIES.items():
        assert name == spec.name
        assert re.fullmatch(r"servekit_[a-z][a-z0-9_]*", name), name
        assert not name.endswith("_total"), "counters are named without _total"
        assert spec.kind in ("counter", "gauge", "histogram")
        if spec.otel_unit == "s":
            assert name.endswith("_seconds"), name
        if name.endswith("_seconds"):
            assert spec.unit == "seconds" and spec.otel_unit == "s"
        if spec.kind == "gauge" and "ratio" in name:
            assert spec.unit == "ratio"
        assert spec.help.endswith(".")
        assert "le" not in spec.labels and "quantile" not in spec.labels
        # Per-model families lead with `model`; the HTTP families are per route.
        assert spec.labels[:1] in ((), ("model",)) or name.startswith("servekit_http_"), name
        assert "path" not in spec.labels, "raw paths would make the label set unbounded"


def test_the_docs_table_lists_every_family_with_its_type_and_labels() -> None:
    text = DOCS.read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0].startswith("`servekit_"):
            rows[cells[0].strip("`")] = cells
    exposed = {(f"{s.name}_total" if s.kind == "counter" else s.name): s for s in FAMILIES.values()}
    assert set(rows) == set(exposed)
    for name, cells in rows.items():
        spec = exposed[name]
        assert cells[1] == spec.kind, name
        for label in spec.labels:
            assert f"`{label}`" in cells[3], (name, label)


def test_docs_example_names_exist() -> None:
    text = DOCS.read_text(encoding="utf-8")
    exposed = {f"{s.name}_total" if s.kind == "counter" else s.name for s in FAMILIES.values()}
    suffixes = ("_bucket", "_count", "_sum")
    for name in set(re.findall(r"\bservekit_[a-z0-9_]+", text)):
        base = next((name[: -len(x)] for x in suffixes if name.endswith(x)), name)
        assert exposed & {name, base} or FAMILIES.keys() & {name, base}, name  # or OTel
