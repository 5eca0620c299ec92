#!/usr/bin/env python3
"""Benchmark: forwarding ``COPY .. TO STDOUT`` into ``COPY .. FROM STDIN``, 1 and 3 destinations.

Starts 4 throwaway PostgreSQL servers (one source, three destinations), loads a source table of
mixed types generated server-side, and measures in one run, for the text and binary formats:

* ``psql``      ``psql -c "COPY .. TO STDOUT" | psql -c "COPY .. FROM STDIN"`` (1 destination),
                the baseline every ratio is taken against;
* ``psql-tee``  the same through ``tee`` and two fifos to 3 destinations;
* ``psycopg``   the psycopg recipe ``for data in copy_out: copy_in.write(data)`` (1 destination);
* ``pypg``      the original engine, py-postgresql's ``postgresql.copyman.transfer`` (1 and 3);
* ``copyman``   ``airflow_copyman.copyman.transfer`` (1 and 3), skipped while not importable;
* ``copyman-base`` the same at another git revision (``--baseline REV``, 1 destination), to
                compare two versions of the engine in one run;
* ``copyman-cap`` ``copyman`` under a bandwidth cap (``--cap MB/s``, 1 destination): the
                report says the rate measured against the rate asked.

Every case runs in a fresh subprocess (``--worker``), so its peak RSS is its own. Destinations
are truncated before each case, outside the timing, and their rows are checked after it.

    .venv/bin/python bench/bench_copy.py                 # full run, 2,000,000 rows
    .venv/bin/python bench/bench_copy.py --rows 200000   # quick run
    .venv/bin/python bench/bench_copy.py --rss-check     # copyman peak RSS, 200k vs 2M rows
    .venv/bin/python bench/bench_copy.py --rows 300000 --only psql,copyman --baseline b0f1618 \
        --cap 10                                         # this engine vs b0f1618, and capped

See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
WORK_ROOT = BENCH_DIR / ".work"  # scratch (fifos, psql memory reports); git-ignored
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

DBNAME = "bench"
DST_TABLE = "bench_dst"
MIB = 1024 * 1024
RSS_FLAT_LIMIT_MIB = 20.0
# py-postgresql speaks no SCRAM: it logs in as this role, whose password is stored as md5.
PYPG_ROLE = "bench_pypg"
PYPG_REQUIREMENT = "py-postgresql==1.3.1"  # as in bench/requirements.txt

COLUMNS = (
    "id bigint NOT NULL, ts timestamptz, txt text, num numeric, arr int[], doc jsonb, uid uuid"
)

# Server-side generated rows; every 997th text has a tab, a newline, a backslash and non-ASCII
# characters (text-format escaping), every 1000th has NULLs.
LOAD_SQL = """
INSERT INTO {table}
SELECT g,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
       CASE WHEN g % 1000 = 0 THEN NULL
            WHEN g % 997 = 0
                 THEN E'tab\\there, newline\\nback\\\\slash "quoted" \u00fcn\u00efc\u00f6d\u00e9'
            ELSE 'row ' || g || ' ' || md5(g::text) END,
       CASE WHEN g % 1000 = 0 THEN NULL ELSE round(g / 7.0, 4) END,
       ARRAY[g % 100, g % 10000, g]::int[],
       jsonb_build_object('id', g, 'even', g % 2 = 0,
                          'tags', jsonb_build_array('t' || (g % 7), g % 3),
                          'score', round(g / 3.0, 2)),
       md5('uuid' || g)::uuid
FROM generate_series(1, {rows}) AS g
"""

# Count and a hash of every row's text form: a wrong byte anywhere changes it.
CHECKSUM_SQL = "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0) FROM {table} AS t"


@dataclass(frozen=True)
class Case:
    method: str
    fanout: int

    @property
    def label(self) -> str:
        return {
            "psql": "psql pipe" if self.fanout == 1 else "psql | tee (fifos)",
            "psycopg": "psycopg loop (copy_out -> write)",
            "pypg": "py-postgresql copyman",
            "copyman": "airflow_copyman.copyman",
            "copyman-base": "airflow_copyman.copyman at --baseline",
            "copyman-cap": "airflow_copyman.copyman, --cap",
        }[self.method]

    @property
    def key(self) -> str:
        return f"{self.method}-{self.fanout}"


ALL_CASES = [
    Case("psql", 1),
    Case("psql", 3),
    Case("psycopg", 1),
    Case("pypg", 1),
    Case("pypg", 3),
    Case("copyman", 1),
    Case("copyman", 3),
    Case("copyman-base", 1),
    Case("copyman-cap", 1),
]
METHODS = ["psql", "psycopg", "pypg", "copyman", "copyman-base", "copyman-cap"]


def copy_statements(fmt: str, src_table: str) -> tuple[str, str]:
    opts = " (FORMAT binary)" if fmt == "binary" else ""
    return f"COPY {src_table} TO STDOUT{opts}", f"COPY {DST_TABLE} FROM STDIN{opts}"


# --------------------------------------------------------------------------------------------
# Worker: one measured case, in its own process. Spec on stdin (it holds passwords), result as
# one JSON line on stdout.
# --------------------------------------------------------------------------------------------


def _peak_rss_kib() -> tuple[int, str]:
    """This process's peak RSS.

    VmHWM rather than ru_maxrss: on Linux a process inherits, through fork/vfork and exec, a
    ru_maxrss at least as large as its parent's RSS at spawn time, so ru_maxrss of a worker would
    include the benchmark driver. VmHWM is the high-water mark of this process image only.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]), "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _current_rss_kib() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _worker_psql(spec: dict[str, Any]) -> dict[str, Any]:
    """The psql pipelines, run by bash. Passwords go to each psql through its environment."""
    psql = spec["psql"]
    src_sql, dst_sql = spec["src_sql"], spec["dst_sql"]
    servers = [spec["src"], *spec["dsts"]]
    time_bin = shutil.which("time", path="/usr/bin:/bin") if spec["use_time"] else None
    # In the driver's work directory, which the driver removes even if this worker is killed.
    tmp = Path(tempfile.mkdtemp(prefix="psql-", dir=spec["workdir"]))
    env = dict(os.environ)
    env.pop("PGPASSWORD", None)
    env["SRC_SQL"], env["DST_SQL"] = src_sql, dst_sql
    for i, server in enumerate(servers):
        env[f"PW{i}"] = server["password"]

    def timed(name: str) -> str:
        if not time_bin:
            return ""
        return f"{shlex.quote(time_bin)} -f '%M %U %S' -o {shlex.quote(str(tmp / name))} "

    def psql_cmd(i: int, sql_var: str) -> str:
        s = servers[i]
        args = [psql, "-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-h", s["host"], "-p",
                str(s["port"]), "-U", s["user"], "-d", s["dbname"]]
        return (f'PGPASSWORD="$PW{i}" {timed(f"rss.psql{i}")}'
                f'{shlex.join(args)} -c "${sql_var}"')

    fanout = len(spec["dsts"])
    if fanout == 1:
        script = (f"set -o pipefail\n{psql_cmd(0, 'SRC_SQL')} | {psql_cmd(1, 'DST_SQL')} "
                  ">/dev/null\n")
    else:
        # Fifos rather than ``>(psql ...)``: bash does not wait for process substitutions, so
        # the timing (and their rusage) would stop before those destinations have committed.
        fifos = []
        lines = ["set -o pipefail", "rc=0"]
        for i in range(1, fanout):
            fifo = tmp / f"fifo{i}"
            os.mkfifo(fifo)
            fifos.append(shlex.quote(str(fifo)))
            lines.append(f"{psql_cmd(i, 'DST_SQL')} <{fifos[-1]} >/dev/null & p{i}=$!")
        lines.append(f"{psql_cmd(0, 'SRC_SQL')} | {timed('rss.tee')}tee {' '.join(fifos)} "
                     f"| {psql_cmd(fanout, 'DST_SQL')} >/dev/null || rc=$?")
        lines += [f"wait $p{i} || rc=$?" for i in range(1, fanout)]
        lines.append("exit $rc")
        script = "\n".join(lines) + "\n"
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"psql pipeline failed ({proc.returncode}): {proc.stderr.strip()}")
        if time_bin:
            # GNU time's last line: "<max RSS KiB> <user s> <system s>", one file per process.
            reports = {p.name[4:]: p.read_text().splitlines()[-1].split()
                       for p in tmp.glob("rss.*")}
            peaks = {name: int(fields[0]) for name, fields in reports.items()}
            cpu = sum(float(fields[1]) + float(fields[2]) for fields in reports.values())
            rss_sum, rss_max, how = sum(peaks.values()), max(peaks.values()), "/usr/bin/time %M"
        else:
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            rss_max, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
            rss_sum, peaks, how = rss_max, {}, "RUSAGE_CHILDREN (largest process)"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"seconds": seconds, "cpu_seconds": cpu,
            "peak_rss_kib": rss_sum, "max_process_rss_kib": rss_max,
            "process_rss_kib": peaks, "rss_source": how, "rows": None, "bytes": None}


def _connect_psycopg(server: dict[str, Any], autocommit: bool) -> Any:
    import psycopg

    return psycopg.connect(host=server["host"], port=server["port"], user=server["user"],
                           password=server["password"], dbname=server["dbname"],
                           autocommit=autocommit)


def _worker_psycopg(spec: dict[str, Any]) -> dict[str, Any]:
    src = _connect_psycopg(spec["src"], autocommit=True)
    (dst,) = [_connect_psycopg(d, autocommit=False) for d in spec["dsts"]]
    rss_before = _current_rss_kib()
    nrows = nbytes = 0
    with src.cursor() as src_cur, dst.cursor() as dst_cur:
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        with src_cur.copy(spec["src_sql"]) as out, dst_cur.copy(spec["dst_sql"]) as inp:
            for data in out:
                inp.write(data)
                nrows += 1
                nbytes += len(data)
        dst.commit()
        seconds = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
    src.close()
    dst.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "rows": nrows, "bytes": nbytes,
            "rss_before_kib": rss_before}


def _patch_py_postgresql() -> None:
    """Make py-postgresql accept Debian's server_version, e.g. "15.18 (Debian 15.18-0+deb12u1)".

    The driver (postgresql/driver/pq3.py, Connection.connect) does
    ``pg_version.normalize(pg_version.split(settings["server_version"]))`` and ``split`` chokes
    on the parenthesised suffix (int("18 (Debian 15")). Parse only the first word.
    """
    import postgresql.versionstring as versionstring

    if getattr(versionstring.split, "_bench_patched", False):
        return
    original = versionstring.split

    def split(vstr: str) -> tuple[Any, ...]:
        words = vstr.split()
        return tuple(original(words[0] if words else vstr))

    split._bench_patched = True  # type: ignore[attr-defined]
    versionstring.split = split


def _worker_pypg(spec: dict[str, Any]) -> dict[str, Any]:
    _patch_py_postgresql()
    import postgresql
    import postgresql.copyman

    def open_(server: dict[str, Any]) -> Any:
        return postgresql.open(host=server["host"], port=server["port"], user=server["user"],
                               password=server["password"], database=server["dbname"])

    src = open_(spec["pypg_src"])
    dsts = [open_(d) for d in spec["pypg_dsts"]]
    rss_before = _current_rss_kib()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    # Each destination COPY runs in its own implicit transaction: it commits when it completes,
    # as with psql -c.
    messages, nbytes = postgresql.copyman.transfer(
        src.prepare(spec["src_sql"]), *[d.prepare(spec["dst_sql"]) for d in dsts]
    )
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    for conn in [src, *dsts]:
        conn.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "rows": messages, "bytes": nbytes,
            "rss_before_kib": rss_before}


def _worker_copyman(spec: dict[str, Any]) -> dict[str, Any]:
    from airflow_copyman import copyman

    src = _connect_psycopg(spec["src"], autocommit=True)
    dsts = [_connect_psycopg(d, autocommit=False) for d in spec["dsts"]]
    rss_before = _current_rss_kib()
    cpu0 = _cpu_seconds()
    options = {"max_bytes_per_second": spec["cap"]} if spec.get("cap") else {}
    t0 = time.perf_counter()
    nrows, nbytes = copyman.transfer(
        copyman.StatementProducer(src, spec["src_sql"]),
        *[copyman.StatementReceiver(d, spec["dst_sql"]) for d in dsts],
        **options,
    )
    for d in dsts:
        d.commit()
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    for conn in [src, *dsts]:
        conn.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "rows": nrows, "bytes": nbytes,
            "rss_before_kib": rss_before, "module": copyman.__file__}


def worker_main() -> int:
    spec = json.loads(sys.stdin.read())
    method = spec["method"]
    if spec.get("pythonpath"):  # another revision of the package (--baseline)
        sys.path.insert(0, spec["pythonpath"])
    if method == "psql":
        result = _worker_psql(spec)
    else:
        if method == "psycopg":
            result = _worker_psycopg(spec)
        elif method == "pypg":
            result = _worker_pypg(spec)
        elif method in ("copyman", "copyman-base", "copyman-cap"):
            result = _worker_copyman(spec)
        else:
            raise SystemExit(f"unknown method {method!r}")
        result["peak_rss_kib"], result["rss_source"] = _peak_rss_kib()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float
    detail: dict[str, Any]


@dataclass
class Outcome:
    case: Case
    fmt: str
    runs: list[Run] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(r.seconds for r in self.runs) if self.runs else None

    @property
    def cpu_seconds(self) -> float | None:
        """Median CPU time (user + system) the client used during the timed part."""
        cpu = [r.detail["cpu_seconds"] for r in self.runs if "cpu_seconds" in r.detail]
        return statistics.median(cpu) if cpu else None

    @property
    def peak_rss_mib(self) -> float | None:
        return max(r.peak_rss_mib for r in self.runs) if self.runs else None


class BenchError(Exception):
    pass


class _Terminated(KeyboardInterrupt):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Terminated(f"signal {signum}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def server_dict(
    server: Any, user: str | None = None, password: str | None = None
) -> dict[str, Any]:
    a = server.address
    return {"host": a.host, "port": a.port, "user": user or a.user,
            "password": password or a.password, "dbname": DBNAME}


def find_psql(servers: list[Any]) -> str:
    for server in servers:
        bindir = getattr(server, "bindir", None)
        if bindir is not None and (Path(bindir) / "psql").exists():
            return str(Path(bindir) / "psql")
    found = shutil.which("psql")
    if not found:
        raise BenchError("psql not found (neither in the servers' bindir nor on PATH)")
    return found


class Bench:
    def __init__(self, args: argparse.Namespace, servers: list[Any]) -> None:
        import psycopg

        self.psycopg = psycopg
        self.args = args
        self.src, self.dsts = servers[0], servers[1:4]
        self.psql = find_psql(servers)
        self.use_time = bool(shutil.which("time", path="/usr/bin:/bin"))
        self.loaded: set[int] = set()
        self.checksums: dict[int, tuple[int, int]] = {}
        self.payload: dict[tuple[int, str], int] = {}
        self.pypg_password: str | None = None
        self.pypg_error: str | None = None
        self.worker: subprocess.Popen[str] | None = None
        self.load_at_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        WORK_ROOT.mkdir(exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="run-", dir=WORK_ROOT))

    # -- connections
    def connect(self, server: Any, **kwargs: Any) -> Any:
        return self.psycopg.connect(server.address.conninfo(DBNAME), **kwargs)

    def setup(self) -> None:
        from airflow_copyman.testing.servers import create_database

        for server in [self.src, *self.dsts]:
            create_database(server.address, DBNAME)
        for server in self.dsts:
            with self.connect(server, autocommit=True) as conn:
                conn.execute(f"CREATE TABLE {DST_TABLE} ({COLUMNS})")
        self._setup_pypg_role()

    def _setup_pypg_role(self) -> None:
        """py-postgresql 1.3 knows md5 but not SCRAM (the servers' host auth): give it a role
        with an md5 password and a pg_hba.conf line of its own, on each throwaway server."""
        import secrets

        self.pypg_password = secrets.token_urlsafe(12)
        try:
            for server in [self.src, *self.dsts]:
                with self.connect(server, autocommit=True) as conn:
                    conn.execute("SET password_encryption = 'md5'")
                    conn.execute(f"DROP ROLE IF EXISTS {PYPG_ROLE}")
                    conn.execute(
                        f"CREATE ROLE {PYPG_ROLE} LOGIN SUPERUSER PASSWORD "
                        f"'{self.pypg_password}'"
                    )
                    row = conn.execute("SHOW hba_file").fetchone()
                    hba = Path(row[0])
                    if not hba.exists():
                        raise BenchError(f"pg_hba.conf not reachable at {hba}")
                    text = hba.read_text()
                    line = f"host all {PYPG_ROLE} 127.0.0.1/32 md5\n"
                    if line not in text:
                        hba.write_text(line + text)
                    conn.execute("SELECT pg_reload_conf()")
        except (BenchError, OSError, self.psycopg.Error) as exc:
            self.pypg_error = f"py-postgresql login could not be set up: {exc}"
            log(self.pypg_error)

    def src_table(self, rows: int) -> str:
        return f"bench_src_{rows}"

    def load(self, rows: int) -> None:
        if rows in self.loaded:
            return
        table = self.src_table(rows)
        log(f"loading {rows:,} rows into {table} (server-side generate_series)")
        t0 = time.perf_counter()
        with self.connect(self.src, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"CREATE TABLE {table} ({COLUMNS})")
            conn.execute(LOAD_SQL.format(table=table, rows=int(rows)))
            # Set hint bits and freeze now, so no measured COPY pays for it.
            conn.execute(f"VACUUM (FREEZE, ANALYZE) {table}")
            conn.execute("CHECKPOINT")
            count, checksum = conn.execute(CHECKSUM_SQL.format(table=table)).fetchone()
            size = conn.execute(
                f"SELECT pg_total_relation_size('{table}')").fetchone()[0]
        if count != rows:
            raise BenchError(f"loaded {count} rows, expected {rows}")
        self.checksums[rows] = (count, int(checksum))
        log(f"loaded in {time.perf_counter() - t0:.1f} s, table {size / MIB:.0f} MiB")
        for fmt in self.args.formats:
            src_sql, _ = copy_statements(fmt, table)
            nbytes = 0
            t0 = time.perf_counter()
            with (
                self.connect(self.src, autocommit=True) as conn,
                conn.cursor() as cur,
                cur.copy(src_sql) as copy,
            ):
                while data := copy.read():
                    nbytes += len(data)
            self.payload[(rows, fmt)] = nbytes
            log(f"{fmt} COPY stream: {nbytes / MIB:.1f} MiB "
                f"(read in {time.perf_counter() - t0:.2f} s)")
        self.loaded.add(rows)

    def reset_destinations(self) -> None:
        for server in self.dsts:
            with self.connect(server, autocommit=True) as conn:
                conn.execute(f"TRUNCATE {DST_TABLE}")
                conn.execute("CHECKPOINT")

    def verify(self, case: Case, rows: int, full: bool) -> None:
        want_count, want_sum = self.checksums[rows]
        for server in self.dsts[: case.fanout]:
            with self.connect(server, autocommit=True) as conn:
                if full:
                    count, checksum = conn.execute(CHECKSUM_SQL.format(table=DST_TABLE)).fetchone()
                else:
                    (count,) = conn.execute(f"SELECT count(*) FROM {DST_TABLE}").fetchone()
                    checksum = want_sum
            if count != want_count or int(checksum) != want_sum:
                raise BenchError(
                    f"destination :{server.address.port} holds {count} rows (checksum "
                    f"{checksum}), expected {want_count} (checksum {want_sum})"
                )

    def spec(self, case: Case, fmt: str, rows: int) -> dict[str, Any]:
        src_sql, dst_sql = copy_statements(fmt, self.src_table(rows))
        dsts = self.dsts[: case.fanout]
        spec: dict[str, Any] = {
            "method": case.method, "src_sql": src_sql, "dst_sql": dst_sql,
            "src": server_dict(self.src), "dsts": [server_dict(d) for d in dsts],
            "psql": self.psql, "use_time": self.use_time, "workdir": str(self.workdir),
        }
        if case.method == "copyman-base":
            spec["pythonpath"] = str(self.baseline_dir())
        if case.method == "copyman-cap":
            spec["cap"] = self.args.cap * 1e6
        if case.method == "pypg":
            spec["pypg_src"] = server_dict(self.src, PYPG_ROLE, self.pypg_password)
            spec["pypg_dsts"] = [server_dict(d, PYPG_ROLE, self.pypg_password) for d in dsts]
        return spec

    def run_worker(self, spec: dict[str, Any]) -> dict[str, Any]:
        # Own session: a Ctrl-C reaches only the driver, which then kills the worker's group
        # (worker, bash, psql) by id, in stop_worker().
        worker = self.worker = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, cwd=str(REPO),
        )
        try:
            out, err = worker.communicate(json.dumps(spec), timeout=self.args.timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"worker timed out after {self.args.timeout} s") from exc
        finally:
            self.stop_worker()
        if worker.returncode != 0:
            tail = err.strip().splitlines()[-12:]
            raise BenchError("worker failed: " + "\n".join(tail))
        return dict(json.loads(out.strip().splitlines()[-1]))

    def stop_worker(self) -> None:
        worker, self.worker = self.worker, None
        if worker is None:
            return
        # The group (bash, psql, tee) may outlive the worker itself. Its id cannot be reused
        # while any member lives; with none left, killpg finds nothing.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            worker.wait(5)

    def baseline_dir(self) -> Path:
        """The package at ``--baseline`` (``git archive``), extracted once."""
        target = self.workdir / f"baseline-{self.args.baseline}"
        if not (target / "airflow_copyman").is_dir():
            target.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", self.args.baseline, "airflow_copyman"],
                capture_output=True, check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        return target

    def unavailable(self, case: Case) -> str | None:
        if case.method.startswith("copyman"):
            path = str(self.baseline_dir()) if case.method == "copyman-base" else ""
            probe = subprocess.run(
                [sys.executable, "-c",
                 "import sys\n"
                 f"sys.path.insert(0, {path!r})\n"
                 "from airflow_copyman import copyman\n"
                 "assert callable(copyman.transfer)\n"
                 "copyman.StatementProducer, copyman.StatementReceiver\n"
                 f"assert {path!r} in copyman.__file__, copyman.__file__"],
                capture_output=True, text=True, cwd=str(REPO),
            )
            if probe.returncode != 0:
                last = (probe.stderr.strip().splitlines() or ["?"])[-1]
                return f"airflow_copyman.copyman not usable yet ({last})"
        if case.method == "pypg":
            if self.pypg_error:
                return self.pypg_error
            return self.ensure_py_postgresql()
        return None

    def ensure_py_postgresql(self) -> str | None:
        def importable() -> bool:
            probe = subprocess.run([sys.executable, "-c", "import postgresql.copyman"],
                                   capture_output=True, text=True)
            return probe.returncode == 0

        if importable():
            return None
        if not self.args.install:
            return f"py-postgresql not installed (pip install {PYPG_REQUIREMENT})"
        log(f"installing {PYPG_REQUIREMENT} into {sys.prefix} (see bench/requirements.txt)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", PYPG_REQUIREMENT],
                       check=False)
        if importable():
            return None
        self.pypg_error = f"py-postgresql could not be installed ({PYPG_REQUIREMENT})"
        return self.pypg_error

    def measure(self, case: Case, fmt: str, rows: int, full_verify: bool) -> Run:
        self.reset_destinations()
        result = self.run_worker(self.spec(case, fmt, rows))
        self.verify(case, rows, full_verify)
        return Run(result["seconds"], result["peak_rss_kib"] / 1024, result)

    def run_cases(self, cases: list[Case], rows: int, repeat: int) -> list[Outcome]:
        outcomes = {(c.key, f): Outcome(c, f) for f in self.args.formats for c in cases}
        for case in cases:
            reason = self.unavailable(case)
            if reason:
                log(f"SKIP {case.key}: {reason}")
                for fmt in self.args.formats:
                    outcomes[(case.key, fmt)].skipped = reason
        # Round robin (repeat -> format -> case), so the machine's noise spreads over all cases.
        for rep in range(repeat):
            for fmt in self.args.formats:
                for case in cases:
                    outcome = outcomes[(case.key, fmt)]
                    if outcome.skipped or outcome.error:
                        continue
                    full = self.args.verify == "full" or (self.args.verify == "first" and rep == 0)
                    try:
                        run = self.measure(case, fmt, rows, full)
                    except BenchError as exc:
                        outcome.error = str(exc)
                        log(f"FAIL {case.key} {fmt}: {exc}")
                        continue
                    outcome.runs.append(run)
                    log(f"{rep + 1}/{repeat} {fmt:6} {case.label} 1->{case.fanout}: "
                        f"{run.seconds:.2f} s, client CPU {run.detail['cpu_seconds']:.2f} s, "
                        f"peak RSS {run.peak_rss_mib:.1f} MiB"
                        f"{' (rows and checksum ok)' if full else ' (rows ok)'}")
        return list(outcomes.values())


# --------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------


def md(text: str) -> str:
    """Text for a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def fmt_num(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def results_table(outcomes: list[Outcome], payload: dict[str, int], rows: int) -> str:
    base: dict[tuple[str, int], float] = {}
    for o in outcomes:
        if o.case.method == "psql" and o.median:
            base[(o.fmt, o.case.fanout)] = o.median
    lines = [
        "| method | fan-out | format | median s | MB/s | rows/s | x psql pipe (1→1) "
        "| x psql same fan-out | client CPU s | client peak RSS MiB | runs s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    formats = ["text", "binary"]
    for o in sorted(outcomes,
                    key=lambda o: (formats.index(o.fmt), o.case.fanout, ALL_CASES.index(o.case))):
        head = f"| {md(o.case.label)} | 1→{o.case.fanout} | {o.fmt} "
        if o.skipped or (o.error and not o.runs):
            why = (o.skipped or o.error or "?").strip().splitlines() or ["?"]
            lines.append(head + f"| {'skipped' if o.skipped else 'FAILED'}: "
                         f"{md(why[-1][:160])} "
                         "| | | | | | | |")
            continue
        med = o.median
        assert med is not None
        pipe = base.get((o.fmt, 1))
        same = base.get((o.fmt, o.case.fanout))
        mbps = payload[o.fmt] / 1e6 / med
        runs = ", ".join(f"{r.seconds:.2f}" for r in o.runs)
        flag = f" (then FAILED: {md(o.error.strip().splitlines()[-1][:120])})" if o.error else ""
        lines.append(
            head + f"| {med:.2f} | {mbps:.1f} | {rows / med:,.0f} "
            f"| {fmt_num(med / pipe if pipe else None, '.2f')} "
            f"| {fmt_num(med / same if same else None, '.2f')} "
            f"| {fmt_num(o.cpu_seconds, '.2f')} "
            f"| {fmt_num(o.peak_rss_mib, '.1f')} | {runs}{flag} |"
        )
    return "\n".join(lines)


def cap_note(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    """The rate each capped run moved (its COPY stream over its whole time, start and
    commit included) against the rate asked."""
    lines = []
    for o in outcomes:
        if o.case.method == "copyman-cap" and o.runs:
            rates = ", ".join(f"{r.detail['bytes'] / 1e6 / r.seconds:.2f}" for r in o.runs)
            lines.append(f"- copyman capped, {o.fmt}: asked {args.cap:g} MB/s, measured "
                         f"{rates} MB/s")
    return "\n\n" + "\n".join(lines) if lines else ""


def environment(bench: Bench, rows_list: list[int]) -> str:
    import psycopg

    with bench.connect(bench.src) as conn:
        server_version = conn.execute("SHOW server_version").fetchone()[0]
    try:
        from importlib.metadata import version

        pypg = version("py-postgresql")
    except Exception:
        pypg = "not installed"
    payload = ", ".join(
        f"{fmt} {bench.payload[(r, fmt)] / MIB:.1f} MiB ({r:,} rows)"
        for r in rows_list for fmt in bench.args.formats if (r, fmt) in bench.payload
    )
    return "\n".join([
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; host: {platform.node()}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}",
        f"- PostgreSQL {server_version}, 4 servers on this host (1 source, 3 destinations), "
        f"{type(bench.src).__name__}; psql: {bench.psql}",
        f"- Python {platform.python_version()}, psycopg {psycopg.__version__} "
        f"({psycopg.pq.__impl__}), py-postgresql {pypg}",
        f"- COPY stream size: {payload}",
        f"- load average (1, 5, 15 min) at the end: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; at the start: {bench.load_at_start}",
    ])


NOTES = """\
How to read it:
- Topology: 4 throwaway servers on the same host (1 source, 3 destinations, so no destination
  shares a server with the source); the host has {cpus} cores, so the servers, the client and the
  kernel compete for them: compare ratios within one run, not absolute times across runs.
- Time: for Python methods, from the start of the COPY to the destinations' commit, inside the
  worker process (connections are opened before); for psql pipelines, the whole pipeline's wall
  time, which also includes starting each psql and its login (about {psql_overhead} per pipeline,
  measured with two psql running a `SET` in a pipe).
- MB/s is the size of one COPY stream (10^6 bytes) over the median time, whatever the fan-out;
  rows/s likewise counts each source row once.
- x psql pipe (1→1): median time over the median of the psql pipe in the same format, same run;
  x psql same fan-out compares 1→3 cases with `psql | tee` (fifos) to 3 destinations.
- Client CPU s: user + system CPU time of the client during the timed part (median): the
  worker process for Python methods, the sum over the psql and tee processes for pipelines.
  It is less sensitive to the machine's noise than wall time.
- Client peak RSS: Python methods run in a fresh subprocess each, and report that process's peak
  (VmHWM: ru_maxrss would include the parent's RSS, inherited at spawn); psql pipelines report
  the sum over the pipeline's processes (each psql and tee, measured with {rss_how}).
- Each case: destinations truncated (and CHECKPOINT) outside the timing; after it, each
  destination's row count is checked{verify_note}. A failed check fails the case.
"""


def write_report(path: Path, title: str, body: str) -> None:
    path.write_text(f"# {title}\n\n{body}\n")
    log(f"wrote {path}")


def psql_overhead(bench: Bench) -> float:
    spec = bench.spec(Case("psql", 1), "text", 0)
    # A statement with no output (under -q): nothing to write into the pipe.
    spec["src_sql"] = spec["dst_sql"] = "SET application_name = 'bench'"
    times = [bench.run_worker(spec)["seconds"] for _ in range(5)]
    return statistics.median(times)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000, help="source rows (default 2,000,000)")
    p.add_argument("--formats", default="text,binary", help="comma list of text,binary")
    p.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    p.add_argument("--only", default="",
                   help=f"comma list of methods ({','.join(METHODS)}) or cases "
                        f"({','.join(c.key for c in ALL_CASES)}); default all")
    p.add_argument("--verify", choices=["count", "first", "full"], default="first",
                   help="after each case check row counts (count), plus a checksum of every row "
                        "in the first repetition (first, default) or in every one (full)")
    p.add_argument("--rss-check", action="store_true",
                   help="instead of the table: copyman's peak RSS at --rss-rows, which must stay "
                        f"flat within {RSS_FLAT_LIMIT_MIB:.0f} MiB")
    p.add_argument("--rss-rows", default="200000,2000000", help="row counts for --rss-check")
    p.add_argument("--no-install", dest="install", action="store_false",
                   help="do not pip-install py-postgresql when it is missing (skip its cases)")
    p.add_argument("--output", type=Path, help="markdown file (default bench/results-<date>.md)")
    p.add_argument("--timeout", type=float,
                   help="seconds per case before its worker is killed (default 60 + rows/10,000)")
    p.add_argument("--baseline", metavar="REV",
                   help="also run copyman as of this git revision (case copyman-base-1)")
    p.add_argument("--cap", type=float, metavar="MB/s",
                   help="also run copyman with max_bytes_per_second = this x 10^6 "
                        "(case copyman-cap-1)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not args.formats or set(args.formats) - {"text", "binary"}:
        p.error("--formats takes text and/or binary")
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    known = set(METHODS) | {c.key for c in ALL_CASES}
    if wanted - known:
        p.error(f"--only: unknown {sorted(wanted - known)}; known: {sorted(known)}")
    if args.rss_check:
        default = {"copyman-1", "copyman-3"}
        args.cases = [
            c for c in ALL_CASES
            if c.key in wanted or c.method in wanted or (not wanted and c.key in default)
        ]
        args.rss_rows = [int(x) for x in args.rss_rows.split(",")]
    else:
        args.cases = [
            c for c in ALL_CASES
            if not wanted or c.key in wanted or c.method in wanted
            or (c.method.startswith("copyman-") and "copyman" in wanted)
        ]
    # The extra copyman cases run only with their option.
    extra = {"copyman-base": args.baseline, "copyman-cap": args.cap}
    args.cases = [c for c in args.cases if extra.get(c.method, True)]
    if args.rows < 1 or args.repeat < 1:
        p.error("--rows and --repeat must be positive")
    if args.timeout is None:
        rows = max([args.rows, *args.rss_rows]) if args.rss_check else args.rows
        args.timeout = 60 + rows / 10_000
    return args


def main(argv: list[str]) -> int:
    if "--worker" in argv:
        return worker_main()
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    from airflow_copyman.testing.servers import throwaway_servers

    today = dt.date.today().isoformat()
    bench: Bench | None = None
    log(f"starting 4 throwaway PostgreSQL servers ({os.cpu_count()} CPUs here)")
    try:
        with throwaway_servers(4) as servers:
            bench = Bench(args, servers)
            bench.setup()
            overhead = psql_overhead(bench)
            log(f"psql pipeline start-up and login overhead: {overhead * 1000:.0f} ms")
            notes = NOTES.format(
                cpus=os.cpu_count(), psql_overhead=f"{overhead * 1000:.0f} ms",
                rss_how="/usr/bin/time %M" if bench.use_time else "RUSAGE_CHILDREN",
                verify_note={"count": "",
                             "first": ", and in the first repetition also a hash of every row "
                                      "against the source",
                             "full": ", and a hash of every row against the source"}[args.verify],
            )
            if args.rss_check:
                return rss_check(bench, args, today)
            bench.load(args.rows)
            outcomes = bench.run_cases(args.cases, args.rows, args.repeat)
            payload = {f: bench.payload[(args.rows, f)] for f in args.formats}
            table = results_table(outcomes, payload, args.rows) + cap_note(outcomes, args)
            body = (f"{args.rows:,} rows, {args.repeat} run(s) per case (median), "
                    f"formats: {', '.join(args.formats)}.\n\n"
                    f"{environment(bench, [args.rows])}\n\n{table}\n\n{notes}")
            errors = [o for o in outcomes if o.error]
            for o in errors:
                body += f"\nFAILED {o.case.key} {o.fmt}: {o.error}\n"
            suffix = "" if args.rows == 2_000_000 else f"-{args.rows}rows"
            out = args.output or BENCH_DIR / f"results-{today}{suffix}.md"
            print("\n" + table + "\n")
            write_report(out, f"COPY forwarding benchmark, {today}", body)
            return 1 if errors else 0
    except KeyboardInterrupt as exc:
        log(f"interrupted ({str(exc) or 'Ctrl-C'}): servers torn down")
        return 130
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        if bench is not None:
            bench.stop_worker()
            shutil.rmtree(bench.workdir, ignore_errors=True)


def rss_check(bench: Bench, args: argparse.Namespace, today: str) -> int:
    small, large = min(args.rss_rows), max(args.rss_rows)
    for rows in (small, large):
        bench.load(rows)
    lines = [
        f"| method | fan-out | format | RSS before the copy MiB | peak RSS at {small:,} rows MiB "
        f"| peak RSS at {large:,} rows MiB | growth MiB | flat (≤ {RSS_FLAT_LIMIT_MIB:.0f} MiB) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    ok = True
    for case in args.cases:
        reason = bench.unavailable(case)
        if reason:
            lines.append(
                f"| {md(case.label)} | 1→{case.fanout} | | skipped: {md(reason)} | | | | |"
            )
            ok = False
            continue
        for fmt in args.formats:
            peaks, before = [], []
            for rows in (small, large):
                # The largest of --repeat runs: the check is about the worst case.
                runs = [bench.measure(case, fmt, rows, full_verify=False)
                        for _ in range(args.repeat)]
                peaks.append(max(r.peak_rss_mib for r in runs))
                before.append(max(r.detail.get("rss_before_kib", 0) / 1024 for r in runs))
                log(f"rss {case.key} {fmt} {rows:,} rows: "
                    f"{', '.join(f'{r.peak_rss_mib:.1f}' for r in runs)} MiB")
            growth = peaks[1] - peaks[0]
            flat = growth <= RSS_FLAT_LIMIT_MIB
            ok &= flat
            lines.append(f"| {md(case.label)} | 1→{case.fanout} | {fmt} | {max(before):.1f} "
                         f"| {peaks[0]:.1f} "
                         f"| {peaks[1]:.1f} | {growth:+.1f} | {'yes' if flat else 'NO'} |")
    table = "\n".join(lines)
    print("\n" + table + "\n")
    body = (f"{environment(bench, [small, large])}\n\n{table}\n\nPeak RSS: VmHWM of the worker "
            f"process (a fresh Python process per run, max of {args.repeat} run(s)); RSS before "
            "the copy: its VmRSS once imports are done and the connections are open.\n")
    write_report(args.output or BENCH_DIR / f"results-{today}-rss.md",
                 f"copyman peak RSS check, {today}", body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
