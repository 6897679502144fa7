"""Real HTTP servers on 127.0.0.1: moto's S3, the GCS emulator, and a webhook receiver for alerts."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from dr_pipelines.core.postgres.cluster import free_port
from dr_pipelines_tests.support.processes import VENV_BIN, stop_process, wait_for_port

# --------------------------------------------------------------------------- S3 (moto) and GCS


@dataclass
class HttpServer:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


def start_moto() -> HttpServer:
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port(port)
    return HttpServer(proc, port)


def start_gcs_emulator() -> HttpServer:
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port(port)
    return HttpServer(proc, port)


# --------------------------------------------------------------------------- alert receiver


class AlertReceiver:
    """A real HTTP server on 127.0.0.1 that records the JSON posted to it; can be stopped and
    started again on the same port (a receiver that is down, then back)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[str, dict]] = []
        self.status = 200
        self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AlertReceiver:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.status < 300:
                    receiver.received.append((self.path, json.loads(body)))
                self.send_response(receiver.status)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self, path: str) -> list[dict]:
        return [b for p, b in self.received if p == path]
