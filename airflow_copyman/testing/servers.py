"""Throwaway PostgreSQL servers for tests, benchmarks and the demo.

Two backends, chosen at run time:

* ``ContainerServer``: testcontainers' PostgreSQL container, where a Docker engine answers;
* ``LocalServer``: a cluster made with the local binaries (``/usr/lib/postgresql/*/bin``),
  on a free loopback port, deleted on ``stop()``.

PostgreSQL refuses to run as root, and CI runs as root: ``LocalServer`` then runs ``initdb``
and ``postgres`` as an unprivileged user (``postgres`` if the system has it, else one it
creates). Every server has a password-protected superuser reached over TCP, so connection
strings look like production ones (and tests can check the password never leaks).

Several servers can run at once, so a test can stop or kill one of them mid-copy.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg

USER = "copyman"
DATABASE = "postgres"

# Durability is of no use in a throwaway server and costs seconds per test.
_FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "60",
    "shared_buffers": "64MB",
    "listen_addresses": "127.0.0.1",
}


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int
    user: str
    password: str

    def conninfo(self, dbname: str = DATABASE) -> str:
        return (
            f"host={self.host} port={self.port} user={self.user} "
            f"password={self.password} dbname={dbname}"
        )

    def uri(self, dbname: str = DATABASE, scheme: str = "postgresql") -> str:
        return (
            f"{scheme}://{quote(self.user)}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(dbname)}"
        )


def connect(address: ServerAddress, dbname: str = DATABASE, **kwargs: Any) -> psycopg.Connection:
    return psycopg.connect(address.conninfo(dbname), **kwargs)


def create_database(address: ServerAddress, dbname: str) -> None:
    with connect(address, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _find_bindir() -> Path | None:
    def major(path: str) -> int:
        name = Path(path).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as, or None to run as ourselves (we are not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "copyman-pg"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "copyman-pg"],
        check=True,
    )
    return pwd.getpwnam("copyman-pg")


class LocalServer:
    """A cluster of the local PostgreSQL binaries, in its own temporary directory."""

    _template_lock = threading.Lock()
    _template: Path | None = None  # one initdb per process; later clusters copy it

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.runas = _unprivileged_user()
        self.password = secrets.token_urlsafe(12)
        self.root = Path(tempfile.mkdtemp(prefix="copyman-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = _free_port()
        self.address = ServerAddress("127.0.0.1", self.port, USER, self.password)
        self._chown(self.root)
        shutil.copytree(self._get_template(bindir), self.datadir, symlinks=True)
        self._chown_tree(self.datadir)
        self.datadir.chmod(0o700)

    # Running commands as the unprivileged user.
    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.runas is not None:
            kwargs = {"user": self.runas.pw_uid, "group": self.runas.pw_gid, "extra_groups": []}
        return subprocess.run(
            args, check=check, capture_output=True, text=True, cwd=self.root, **kwargs
        )

    def _chown(self, path: Path) -> None:
        if self.runas is not None:
            os.chown(path, self.runas.pw_uid, self.runas.pw_gid)

    def _chown_tree(self, path: Path) -> None:
        if self.runas is None:
            return
        self._chown(path)
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), self.runas.pw_uid, self.runas.pw_gid,
                         follow_symlinks=False)

    @classmethod
    def _get_template(cls, bindir: Path) -> Path:
        with cls._template_lock:
            if cls._template is None:
                cls._template = cls._initdb_template(bindir)
            return cls._template

    @classmethod
    def _initdb_template(cls, bindir: Path) -> Path:
        runas = _unprivileged_user()
        root = Path(tempfile.mkdtemp(prefix="copyman-pgtemplate-"))
        kwargs: dict[str, Any] = {}
        if runas is not None:
            os.chown(root, runas.pw_uid, runas.pw_gid)
            kwargs = {"user": runas.pw_uid, "group": runas.pw_gid, "extra_groups": []}
        pwfile = root / "pw"
        # The template's password is replaced per cluster at start (ALTER ROLE).
        pwfile.write_text("template\n")
        if runas is not None:
            os.chown(pwfile, runas.pw_uid, runas.pw_gid)
        datadir = root / "data"
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(datadir), "-U", USER, f"--pwfile={pwfile}",
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            check=True, capture_output=True, text=True, cwd=root, **kwargs,
        )
        pwfile.unlink()
        import atexit

        atexit.register(shutil.rmtree, root, True)
        return datadir

    def start(self) -> None:
        opts = " ".join(f"-c {k}={v}" for k, v in _FAST_SETTINGS.items())
        opts += f" -p {self.port} -k {self.root}"
        result = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
            "-o", opts, "-w", "-t", "60", "start", check=False,
        )
        if result.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}\n{log[-2000:]}")
        # Local socket auth is trust: set this cluster's own password.
        with psycopg.connect(host=str(self.root), port=self.port, user=USER,
                             dbname=DATABASE, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE {USER} PASSWORD '{self.password}'")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` or ``immediate`` (a crash, as far as clients can tell)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w",
                  "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster: the server vanishes without a word to its clients."""
        pidfile = self.datadir / "postmaster.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class ContainerServer:
    """testcontainers' PostgreSQL container (used where a Docker engine answers)."""

    def __init__(self, image: str = "postgres:15-alpine") -> None:
        from testcontainers.postgres import PostgresContainer

        self.password = secrets.token_urlsafe(12)
        self.container = PostgresContainer(image, username=USER, password=self.password,
                                           dbname=DATABASE)
        self.address = ServerAddress("127.0.0.1", 0, USER, self.password)

    def start(self) -> None:
        if self.address.port == 0:
            self.container.start()
            host = self.container.get_container_host_ip()
            port = int(self.container.get_exposed_port(5432))
            self.address = ServerAddress(host, port, USER, self.password)
        else:
            self.container.get_wrapped_container().start()
        _wait_ready(self.address)

    def stop(self, mode: str = "fast") -> None:
        wrapped = self.container.get_wrapped_container()
        if mode == "immediate":
            wrapped.kill()
        else:
            wrapped.stop()

    def kill(self) -> None:
        self.container.get_wrapped_container().kill()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.container.stop()


def _wait_ready(address: ServerAddress, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect(address, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def docker_available() -> bool:
    if os.environ.get("COPYMAN_TEST_BACKEND") == "local":
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def new_server() -> LocalServer | ContainerServer:
    """Start a new throwaway server, from Docker if it answers, else from local binaries."""
    server: LocalServer | ContainerServer
    if docker_available():
        server = ContainerServer()
    else:
        bindir = _find_bindir()
        if bindir is None:
            raise RuntimeError(
                "no Docker engine and no PostgreSQL binaries (initdb) found: install the "
                "'postgresql' package or start Docker"
            )
        server = LocalServer(bindir)
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server


@dataclass
class ServerPool:
    """Servers started on demand and destroyed together."""

    servers: list[LocalServer | ContainerServer] = field(default_factory=list)

    def new(self) -> LocalServer | ContainerServer:
        server = new_server()
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.destroy()
        self.servers.clear()


@contextlib.contextmanager
def throwaway_servers(count: int) -> Iterator[list[LocalServer | ContainerServer]]:
    pool = ServerPool()
    try:
        yield [pool.new() for _ in range(count)]
    finally:
        pool.close()
