"""moto's S3 server over TLS on 127.0.0.1, for the peer benchmarks (`bench/peers.py`).

    python bench/moto_tls.py PORT CERT KEY

pgBackRest speaks S3 only over TLS, so every tool (ours, pgBackRest, barman-cloud) reaches the one
endpoint over HTTPS. moto's own `moto_server --ssl-cert` closes each connection (it answers
`Connection: close`) without a TLS close_notify, which OpenSSL 3 clients that read to the end of the
connection, pgBackRest among them, report as "unexpected eof while reading" and retry until they
fail. This server is moto's, with a request handler that ends TLS properly before closing.
"""

from __future__ import annotations

import socket
import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, run_simple


class CloseNotifyHandler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        # Replies go out in several TLS records; without TCP_NODELAY, Nagle holds the next one until
        # the client's delayed ACK of the last (~40 ms), on every request: a stall no S3 server has.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # the client is already gone

    def handle(self) -> None:
        super().handle()
        try:
            self.connection.settimeout(5)
            self.connection.unwrap()  # type: ignore[attr-defined]  (an SSLSocket: sends close_notify)
        except (OSError, ValueError, AttributeError):
            pass  # the client closed first, or the connection is already gone


def main() -> int:
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        "127.0.0.1",
        port,
        app,
        threaded=True,
        ssl_context=(cert, key),
        request_handler=CloseNotifyHandler,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
