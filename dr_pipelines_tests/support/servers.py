"""Real HTTP servers on 127.0.0.1: moto's S3, the GCS emulator, and a webhook receiver for alerts;
and a TCP proxy in front of a server, to make it fail in the middle."""

from __future__ import annotations

import socket
import subprocess
import threading
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


class FaultyProxy:
    """A TCP proxy on 127.0.0.1 to a server on `target_port`, that can fail in two ways:
    - `switch(False)`: the server goes away. The open connections are cut and new ones are
      accepted and never answered (a network that swallows requests: the hardest kind of down,
      each call waits for its timeout); `switch(True)` brings it back.
    - `hold.set()`: the next request containing `method` (an upload: b"PUT "; a download: b"GET ")
      is held (`held` is set) until `release()`, then dropped: a push or fetch caught midway."""

    def __init__(self, target_port: int, method: bytes = b"PUT "):
        self.target_port, self.method = target_port, method
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.up = True
        self.hold, self.held, self.released = threading.Event(), threading.Event(), threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.closed:
                client.close()
                return
            if not self.up:
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _swallow(self, client: socket.socket) -> None:
        with self.lock:
            self.conns.append(client)
        try:
            while client.recv(1 << 16):
                pass
        except OSError:
            pass

    def _pump(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if request and self.hold.is_set() and self.method in chunk:
                    self.held.set()
                    self.released.wait(60)
                    break  # dropped: this request never reaches the server
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def switch(self, up: bool) -> None:
        self.up = up
        if not up:
            with self.lock:
                conns, self.conns = self.conns, []
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()

    def release(self) -> None:
        self.hold.clear()
        self.released.set()

    def close(self) -> None:
        """Stop accepting before the listening socket's fd is closed: a thread still inside
        accept() on a closed fd number would take the next socket given that number (the next
        test's proxy) and swallow its connections."""
        self.release()
        self.switch(False)
        self.closed = True
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()  # wakes accept()
        except OSError:
            pass
        self.acceptor.join(10)
        self.server.close()


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
