"""A small TCP proxy for network-fault tests: stall, drop or black-hole one direction.

Sits on a free loopback port in front of a test server. Each direction of each proxied
connection can be set to:

* ``forward`` (the default): bytes pass through;
* ``stall``: bytes are held back (the link stays open, nothing arrives; ``forward`` again
  releases them in order), like a peer that is alive but silent;
* ``drop``: bytes are read and thrown away, like a reply lost for good.

``accept_only=True`` makes a server that accepts TCP connections and never answers
(nothing is forwarded to the real server at all).

Only loopback addresses are used: the proxy listens on 127.0.0.1 and connects to the test
server's address.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Literal

Direction = Literal["to_server", "to_client"]
Mode = Literal["forward", "stall", "drop"]

_CHUNK = 64 * 1024
_POLL = 0.05  # how often a pump re-reads its mode


class _Link:
    """One proxied connection: a client socket and its upstream socket, pumped both ways."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket | None):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()

    def start(self) -> None:
        if self.upstream is None:
            return  # accept-only: hold the client socket open, never answer
        for src, dst, direction in (
            (self.client, self.upstream, "to_server"),
            (self.upstream, self.client, "to_client"),
        ):
            threading.Thread(
                target=self._pump, args=(src, dst, direction), daemon=True,
                name=f"proxy-{direction}",
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        held = bytearray()
        try:
            while not self.closed.is_set():
                mode = self.proxy.modes[direction]
                if held and mode == "forward":
                    dst.sendall(held)
                    held.clear()
                readable, _, _ = select.select([src], [], [], _POLL)
                if not readable:
                    continue
                data = src.recv(_CHUNK)
                if not data:
                    if held and self.proxy.modes[direction] == "forward":
                        dst.sendall(held)
                    break
                mode = self.proxy.modes[direction]
                if mode == "forward":
                    dst.sendall(data)
                elif mode == "stall":
                    held += data
                # "drop": discard
        except OSError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


class TcpProxy:
    """A TCP proxy on 127.0.0.1 to ``(host, port)``; a context manager.

    :param accept_only: accept connections and never answer them (no upstream at all).
    """

    def __init__(self, host: str, port: int, *, accept_only: bool = False) -> None:
        self.target = (host, port)
        self.accept_only = accept_only
        self.modes: dict[Direction, Mode] = {"to_server": "forward", "to_client": "forward"}
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.host, self.port = "127.0.0.1", self._listener.getsockname()[1]
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="proxy-accept")
        self._thread.start()

    def set(self, direction: Direction, mode: Mode) -> None:
        """Change how one direction of every connection (current and future) behaves."""
        self.modes[direction] = mode

    def forward_all(self) -> None:
        self.modes["to_server"] = self.modes["to_client"] = "forward"

    @property
    def connections(self) -> int:
        """How many proxied connections are open now."""
        with self._lock:
            return sum(1 for link in self._links if not link.closed.is_set())

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                readable, _, _ = select.select([self._listener], [], [], _POLL)
                if not readable:
                    continue
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = None
            if not self.accept_only:
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    client.close()
                    continue
            link = _Link(self, client, upstream)
            with self._lock:
                self._links.append(link)
            link.start()

    def close(self) -> None:
        """Stop accepting and close every proxied connection (both ends)."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()
        self._thread.join(timeout=2)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
