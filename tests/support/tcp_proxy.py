"""A TCP proxy in front of PostgreSQL that can make its open connections go silent, like a dead network path.

`freeze()` stops forwarding on every connection open at that moment without closing anything: neither end sees
a FIN or a reset, exactly as when a NAT entry or a host vanishes. Connections opened afterwards work normally,
so a client that notices the silence and reconnects gets through.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Bytes read per forwarding step.
CHUNK = 65536


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream host and port, one thread per direction and connection."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._frozen: set[int] = set()  # generation numbers of frozen connections
        self._generation = 0
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()
        threading.Thread(target=self._accept, name="tcp-proxy-accept", daemon=True).start()

    def freeze(self) -> int:
        """Silence every connection open now; returns how many."""
        with self._lock:
            frozen = self._generation
            self._frozen.update(range(frozen + 1))
            self._generation += 1
            return len(self._sockets) // 2

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._server.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                generation = self._generation
                self._sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pipe, args=(source, target, generation), name="tcp-proxy-pipe", daemon=True
                ).start()

    def _pipe(self, source: socket.socket, target: socket.socket, generation: int) -> None:
        try:
            while not self._stopping.is_set():
                data = source.recv(CHUNK)
                if not data:
                    break
                with self._lock:
                    frozen = generation in self._frozen
                if frozen:
                    continue  # swallow it: the other end waits forever, as behind a dead link
                target.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                frozen = generation in self._frozen
            if not frozen:
                for sock in (source, target):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def running_proxy(upstream_host: str, upstream_port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(upstream_host, upstream_port)
    try:
        yield proxy
    finally:
        proxy.close()
