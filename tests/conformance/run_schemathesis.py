"""TR-11: schemathesis over the Open Inference Protocol REST spec against a real
`servekit serve` on 127.0.0.1; exits with schemathesis's status (0: no failures).

Run by ``nox -s conformance``; needs the ``serve`` extra and schemathesis.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPEC = HERE / "open_inference_rest.servekit-patched.yaml"
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
        "unsupported_method",
        "allow_header_conformance",
        "missing_required_header",
    ]
)
MODEL = """
import servekit as sk


def identity(batch):
    return batch


predictor = sk.Predictor(identity, name="m")
"""


def main() -> int:
    """Serve, wait for readiness, run schemathesis, stop; return its exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "conformance_app.py").write_text(MODEL)
        # Requests to the served model's own name, so that infer is exercised too.
        (folder / "schemathesis.toml").write_text(
            '[parameters]\n"path.MODEL_NAME" = "m"\n"path.MODEL_VERSION" = "1"\n'
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(folder)}
        serve = [sys.executable, "-m", "servekit", "serve", "conformance_app:predictor"]
        server = subprocess.Popen(
            [*serve, "--port", str(port), "--log-level", "warning"],
            cwd=folder,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready"):
                        break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        print("servekit serve did not become ready", file=sys.stderr)
                        return 1
                    time.sleep(0.1)
            budget = os.environ.get("ST_MAX_TIME", "120")
            run = ["schemathesis", "run", str(SPEC), "--url", f"http://127.0.0.1:{port}"]
            options = ["--checks", CHECKS, "--max-time", budget, "--max-examples", "100"]
            return subprocess.call([*run, *options], cwd=folder)
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
