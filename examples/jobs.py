"""Background jobs with a signed webhook: submit, poll, and verify the callback.

Run it with ``python examples/jobs.py``. It starts a small webhook receiver on
127.0.0.1 that checks each delivery's Standard Webhooks signature by hand, runs a
JobQueue over a SQLite store in a temporary directory, submits a few jobs (one with a
webhook), polls one until it is done, and waits for the webhook. It leaves no files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from servekit.jobs import JobQueue, SQLiteJobStore, Webhooks, generate_secret


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Check a Standard Webhooks signature, as any receiver can without servekit."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id = headers["webhook-id"]
    timestamp = headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > 5 * 60:
        return False  # too old (or from the future): refuse replays
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    # The header may hold several space-separated signatures ("v1,<sig> v1,<sig>").
    return any(
        hmac.compare_digest(expected, part.removeprefix("v1,"))
        for part in headers["webhook-signature"].split()
        if part.startswith("v1,")
    )


def start_receiver(secret: str, events: queue.Queue[dict[str, object]]) -> ThreadingHTTPServer:
    """A webhook receiver on 127.0.0.1, on a free port, in a background thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {name.lower(): value for name, value in self.headers.items()}
            if not verify(secret, headers, body):
                self.send_response(401)
                self.end_headers()
                return
            # Answer 2xx quickly; do the real work elsewhere. A retry of the same event
            # carries the same webhook-id, so a receiver can drop duplicates by it.
            self.send_response(204)
            self.end_headers()
            events.put({"webhook-id": headers["webhook-id"], **json.loads(body)})

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep the demo's output short

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def square(batch: list[float]) -> list[float]:
    """The model: a batch function, one output per input."""
    time.sleep(0.05)  # pretend to work
    return [x * x for x in batch]


def main() -> None:
    secret = generate_secret()
    events: queue.Queue[dict[str, object]] = queue.Queue()
    server = start_receiver(secret, events)
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks/jobs"
    print(f"webhook receiver listening on {url}")

    # Webhooks refuse loopback, private and link-local addresses by default (SSRF
    # defence). Allowing 127.0.0.1 here is an explicit opt-in for this local demo only.
    webhooks = Webhooks(secret, allow_networks=("127.0.0.1/32",))

    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = SQLiteJobStore(Path(tmp) / "jobs.sqlite3")
            try:
                with JobQueue(square, store=store, workers=2, webhooks=webhooks) as jobs:
                    plain = [jobs.submit(x) for x in (1.0, 2.0, 3.0)]
                    hooked = jobs.submit(12.0, webhook=url)
                    print(f"submitted {len(plain) + 1} jobs; job {hooked.id} has a webhook")

                    # Poll one job with get() until it reaches a terminal state.
                    job = jobs.get(hooked.id)
                    while not job.status.terminal:
                        time.sleep(0.02)
                        job = jobs.get(hooked.id)
                    print(f"polled: status={job.status.value} result={job.result}")

                    for other in plain:
                        done = jobs.wait(other.id, timeout_s=10)
                        print(f"job {done.id[:8]}...: {done.input} -> {done.result}")

                    event = events.get(timeout=10)
                    data = event["data"]
                    assert isinstance(data, dict)
                    print(
                        f"webhook verified: type={event['type']} id={event['webhook-id']} "
                        f"result={data['result']}"
                    )

                    # The delivery is recorded on the job once the receiver answered 2xx.
                    deadline = time.monotonic() + 10
                    job = jobs.get(hooked.id)
                    while job.callback_state is None or job.callback_state.value == "pending":
                        if time.monotonic() > deadline:
                            raise TimeoutError("webhook delivery was not recorded")
                        time.sleep(0.02)
                        job = jobs.get(hooked.id)
                    print(f"callback_state={job.callback_state.value}")
            finally:
                store.close()  # the queue closes only a store it opened itself
    finally:
        server.shutdown()
        server.server_close()
    print("done")


if __name__ == "__main__":
    main()
