"""The test proxy itself: each fault it injects must really happen (else the tests built on
it would pass for the wrong reason)."""

from __future__ import annotations

import time

import psycopg
import pytest

from airflow_copyman.testing.proxy import TcpProxy
from airflow_copyman.testing.servers import ContainerServer, LocalServer


def _connect(
    proxy: TcpProxy, server: LocalServer | ContainerServer, **kw: object
) -> psycopg.Connection:
    a = server.address
    return psycopg.connect(
        host=proxy.host, port=proxy.port, user=a.user, password=a.password,
        dbname="postgres", autocommit=True, **kw,
    )


def test_forward_and_stall(server: LocalServer | ContainerServer) -> None:
    with TcpProxy(server.address.host, server.address.port) as proxy:
        conn = _connect(proxy, server)
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        proxy.set("to_client", "stall")
        conn.pgconn.send_query(b"SELECT 7")
        conn.pgconn.flush()
        time.sleep(0.5)
        conn.pgconn.consume_input()
        assert conn.pgconn.is_busy(), "a stalled reply must not arrive"
        proxy.set("to_client", "forward")
        deadline = time.monotonic() + 5
        while conn.pgconn.is_busy() and time.monotonic() < deadline:
            time.sleep(0.05)
            conn.pgconn.consume_input()
        result = conn.pgconn.get_result()
        assert result is not None and result.get_value(0, 0) == b"7"
        conn.close()


def test_drop_loses_the_reply(server: LocalServer | ContainerServer) -> None:
    with TcpProxy(server.address.host, server.address.port) as proxy:
        conn = _connect(proxy, server)
        proxy.set("to_client", "drop")
        conn.pgconn.send_query(b"SELECT 1")
        conn.pgconn.flush()
        time.sleep(0.5)
        conn.pgconn.consume_input()
        assert conn.pgconn.is_busy(), "a dropped reply must never arrive"
        proxy.close()


def test_accept_only_never_answers(server: LocalServer | ContainerServer) -> None:
    with TcpProxy(server.address.host, server.address.port, accept_only=True) as proxy:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            _connect(proxy, server, connect_timeout=2)
        assert 1.5 <= time.monotonic() - started < 10
        assert proxy.connections >= 1
