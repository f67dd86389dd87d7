"""JobQueue's webhook deliverer, and the id and body of a job's notification.

:class:`_WebhookDeliverer` is a mixin of :class:`~servekit.jobs.JobQueue` (see ``_queue``
for how the parts fit): its thread sends due webhooks, at most ``max_concurrency`` at
once, and records each attempt on the job. Signing, the URL checks and the HTTP POST
itself are in ``_webhooks``.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from ..errors import ServekitError, StoreUnavailable
from ._records import Job, encode_payload, job_dict
from ._store import JobStore
from ._webhooks import Webhooks, deliver

__all__ = ["webhook_body", "webhook_id"]

_log = logging.getLogger("servekit.jobs")


class _WebhookDeliverer:
    """The webhook delivery of a :class:`JobQueue`. A mixin: ``JobQueue.__init__`` sets
    the state below."""

    webhooks: Webhooks | None
    poll_interval_s: float
    _store: JobStore
    _stop: threading.Event
    _deliveries: dict[str, int]
    _deliveries_lock: threading.Lock

    # --- webhooks ------------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        webhooks = self.webhooks
        assert webhooks is not None
        # A delivery is held for longer than one attempt can take, then due again.
        hold_s = webhooks.connect_timeout_s + webhooks.read_timeout_s + 5.0
        # At most max_concurrency deliveries in flight; a slot is refilled as soon as it
        # frees, so a slow receiver takes one slot (for at most its timeouts) and the
        # other receivers keep being served (CB-02).
        slots = threading.Semaphore(webhooks.max_concurrency)
        freed = threading.Event()

        def run(job: Job) -> None:
            try:
                self._deliver_one(job)
            finally:
                slots.release()
                freed.set()

        with ThreadPoolExecutor(
            webhooks.max_concurrency, thread_name_prefix="servekit-webhook"
        ) as pool:
            while not self._stop.is_set():
                free = 0
                while slots.acquire(blocking=False):
                    free += 1
                due: builtins.list[Job] = []
                if free:
                    try:
                        due = self._store.claim_deliveries(hold_s, limit=free)
                    except StoreUnavailable as exc:
                        _log.warning("job store unavailable for webhooks, retrying: %s", exc)
                for job in due:
                    pool.submit(run, job)
                for _ in range(free - len(due)):
                    slots.release()
                if len(due) < free or free == 0:
                    freed.wait(self.poll_interval_s)
                    freed.clear()

    def _deliver_one(self, job: Job) -> None:
        webhooks = self.webhooks
        assert webhooks is not None
        assert job.webhook_url is not None
        body = webhook_body(job)
        error: str | None
        try:
            result = deliver(webhooks, job.webhook_url, webhook_id(job), body)
        except Exception as exc:  # never let one delivery stop the loop
            _log.exception("webhook delivery of job %s raised", job.id[:6])
            delivered, error, retryable = False, f"{type(exc).__name__}: {exc}", True
        else:
            delivered, error, retryable = result.delivered, result.error, result.retryable
        attempts = job.callback_attempts + 1
        retry_in = None
        if not delivered and retryable and attempts < webhooks.max_attempts:
            retry_in = webhooks.backoff(attempts)
        kind = "delivered" if delivered else "retrying" if retry_in is not None else "failed"
        with self._deliveries_lock:
            self._deliveries[kind] += 1
        try:
            self._store.record_delivery(
                job.id, delivered=delivered, error=error, retry_in_s=retry_in
            )
        except ServekitError as exc:
            _log.error("webhook delivery of job %s not recorded: %s", job.id[:6], exc)


def webhook_id(job: Job) -> str:
    """The ``webhook-id`` of a job's notification: the same on every retry, so a
    receiver can drop duplicates."""
    return f"msg_{job.id}"


def webhook_body(job: Job) -> bytes:
    """The JSON body posted for a finished job, in the Standard Webhooks shape
    ``{"type", "timestamp", "data"}``; ``data`` is what polling shows."""
    finished = job.finished_at if job.finished_at is not None else time.time()
    payload = {
        "type": f"job.{job.status.value}",
        "timestamp": datetime.fromtimestamp(finished, timezone.utc).isoformat(),
        "data": job_dict(job),
    }
    return encode_payload(payload).encode("utf-8")
