"""The load layer is Airflow-free (issue 10, "Shape"): a fresh interpreter in which Airflow
cannot be imported runs a real load through ``airflow_copyman.load`` with plain psycopg
connections, ledger and ``verify="checksum"`` included."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import psycopg

from airflow_copyman.testing.servers import ContainerServer, LocalServer, create_database

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["airflow"] = None  # any "import airflow..." now raises ImportError
    from airflow_copyman import load

    src = load.postgres("src", sys.argv[1])
    dst = load.postgres("wh", sys.argv[2])
    ledger = load.Ledger(None, load.TaskKey("cli", "orders", "run-1", -1, "lineage-1", 1))
    report = load.run(
        src, "SELECT id, v FROM items",
        [load.Destination("wh", "items", mode="merge", key=("id",)),
         {"conn_id": "wh", "table": "items_copy", "create": "if_missing"}],
        endpoints={"wh": dst}, ledger=ledger, min_rows=1, verify="checksum",
    )
    print(json.dumps({
        "report": report.as_dict(),
        "airflow": sorted(m for m in sys.modules if m == "airflow" or m.startswith("airflow.")),
    }))
    """
)


def test_a_load_runs_with_airflow_unimportable(server: LocalServer | ContainerServer) -> None:
    names = ("noaf_src", "noaf_dst")
    for name in names:
        create_database(server.address, name)
    src_info, dst_info = (server.address.conninfo(name) for name in names)

    with psycopg.connect(src_info, autocommit=True) as conn:
        conn.execute("CREATE TABLE items AS SELECT g AS id, 'v' || g AS v "
                     "FROM generate_series(1, 100) g")
    with psycopg.connect(dst_info, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int, v text); INSERT INTO items VALUES (1, 'old')")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, src_info, dst_info],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["airflow"] == ["airflow"], out  # only the blocker: nothing of Airflow loaded
    merged, copied = out["report"]["destinations"]
    assert (merged["status"], merged["inserted"], merged["updated"]) == ("loaded", 99, 1)
    assert (copied["status"], copied["rows"]) == ("loaded", 100)
    # Verified, the created table too (its columns described once it exists).
    assert merged["checksum"] == copied["checksum"] and merged["checksum"].startswith("100:")
    with psycopg.connect(dst_info) as conn:
        assert conn.execute("SELECT count(*), min(v) FROM items").fetchone() == (100, "v1")
        assert conn.execute("SELECT count(*) FROM items_copy").fetchone() == (100,)
        assert conn.execute("SELECT count(*) FROM copyman_ledger").fetchone() == (2,)
