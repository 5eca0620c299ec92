"""``copyman copy`` and ``copyman run`` in each mode, run as a subprocess against real
servers, the ``--json`` report checked against the tables."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from af_support import Database

from airflow_copyman.testing.servers import create_database
from tests.cli_support import copyman, dsn

_names = itertools.count()
ITEMS = "CREATE TABLE items (id int PRIMARY KEY, name text, amount numeric(10, 2))"
SOURCE_ROWS = [(1, "one", 1.5), (2, "two", 2.5), (3, "three", 3.5)]


@pytest.fixture
def new_db(server: object) -> Callable[[str], Database]:
    def make(prefix: str) -> Database:
        name = f"cli_{prefix}_{next(_names)}"
        create_database(server.address, name)  # type: ignore[attr-defined]
        return Database(server, name)  # type: ignore[arg-type]
    return make


@pytest.fixture
def src(new_db: Callable[[str], Database]) -> Database:
    db = new_db("src")
    db.execute(ITEMS)
    db.execute("INSERT INTO items VALUES (1, 'one', 1.5), (2, 'two', 2.5), (3, 'three', 3.5)")
    return db


def items(db: Database, table: str = "items") -> list[tuple[object, ...]]:
    return [(i, n, float(a)) for i, n, a in db.execute(f"SELECT * FROM {table} ORDER BY id")]


def test_copy_appends_and_reports_rows_in_json(src: Database, new_db: Callable[[str], Database]
                                                ) -> None:
    dst = new_db("dst")
    dst.execute(ITEMS)
    dst.execute("INSERT INTO items VALUES (100, 'kept', 0)")
    done = copyman("copy", dsn(src), "SELECT * FROM items", dsn(dst), "items", "--json",
                   password=src.address.password)
    assert done.status == 0, done.stderr
    report = done.report
    assert (report["rows"], report["format"]) == (3, "binary")
    [entry] = report["destinations"]
    assert (entry["status"], entry["rows"], entry["mode"]) == ("loaded", 3, "append")
    assert items(dst) == [*SOURCE_ROWS, (100, "kept", 0.0)]
    assert "copyman: done" in done.stderr  # progress and summary go to stderr only


@pytest.mark.parametrize("replace_with", ["truncate", "delete"])
def test_copy_replaces_the_tables_rows(src: Database, new_db: Callable[[str], Database],
                                        replace_with: str) -> None:
    dst = new_db("dst")
    dst.execute(ITEMS)
    dst.execute("INSERT INTO items VALUES (1, 'old', 0), (100, 'gone', 0)")
    done = copyman("copy", dsn(src), "items", dsn(dst), "public.items", "--mode", "replace",
                   "--replace-with", replace_with, "--json", "--quiet",
                   password=src.address.password)
    assert (done.status, done.stderr) == (0, "")
    [entry] = done.report["destinations"]
    assert (entry["status"], entry["rows"], entry["mode"]) == ("loaded", 3, "replace")
    assert items(dst) == SOURCE_ROWS


def test_copy_merges_by_key_and_reports_inserted_and_updated(
    src: Database, new_db: Callable[[str], Database]
) -> None:
    dst = new_db("dst")
    dst.execute(ITEMS)
    dst.execute("INSERT INTO items VALUES (1, 'old', 0), (2, 'two', 2.5), (100, 'kept', 0)")
    done = copyman("copy", dsn(src), "SELECT id, name, amount FROM items WHERE id >= %(low)s",
                   dsn(dst), "items", "--mode", "merge", "--key", "id", "-p", "low=1",
                   "--verify", "checksum", "--json", password=src.address.password)
    assert done.status == 0, done.stderr
    [entry] = done.report["destinations"]
    assert (entry["status"], entry["rows"]) == ("loaded", 3)
    # id 1 changed, id 2 is the same (left as it is), id 3 is new.
    assert (entry["inserted"], entry["updated"]) == (1, 1)
    assert items(dst) == [*SOURCE_ROWS, (100, "kept", 0.0)]


def test_run_loads_every_destination_of_a_load_file_in_its_mode(
    src: Database, new_db: Callable[[str], Database], tmp_path: Path
) -> None:
    appended, replaced, merged = new_db("app"), new_db("rep"), new_db("mer")
    appended.execute(ITEMS)
    merged.execute(ITEMS)
    merged.execute("INSERT INTO items VALUES (3, 'old', 0), (7, 'kept', 7)")
    loadfile = tmp_path / "items.toml"
    loadfile.write_text(f"""
source = {{ dsn = "env:SOURCE_DSN", name = "sales" }}
sql = "SELECT * FROM items WHERE id <= %(top)s"
parameters = {{ top = "3" }}
format = "text"

[[destinations]]
dsn = "{dsn(appended)}"
table = "items"

[[destinations]]
name = "reporting"
dsn = "{dsn(replaced)}"
table = "copy_of_items"
mode = "replace"
create = "if_missing"

[[destinations]]
dsn = "{dsn(merged)}"
table = "items"
mode = "merge"
key = ["id"]
""")
    done = copyman("run", str(loadfile), "--json", "--verify", "checksum",
                   password=src.address.password, SOURCE_DSN=dsn(src))
    assert done.status == 0, done.stderr
    report = done.report
    assert (report["rows"], report["format"]) == (3, "text")
    first, second, third = report["destinations"]
    assert [d["status"] for d in report["destinations"]] == ["loaded"] * 3
    assert [d["rows"] for d in report["destinations"]] == [3, 3, 3]
    assert [d["mode"] for d in report["destinations"]] == ["append", "replace", "merge"]
    assert second["conn_id"] == "reporting"
    assert first["conn_id"] == f"{src.address.host}:{src.address.port}/{appended.name}"
    assert (third["inserted"], third["updated"]) == (2, 1)
    assert "from sales (" in done.stderr  # the source's name, in the load's lines
    assert items(appended) == SOURCE_ROWS
    assert items(replaced, "copy_of_items") == SOURCE_ROWS
    assert items(merged) == [*SOURCE_ROWS, (7, "kept", 7.0)]


def test_copy_reaches_a_service_and_passes_columns_and_operators(
    src: Database, new_db: Callable[[str], Database], tmp_path: Path
) -> None:
    dst = new_db("dst")
    dst.execute("CREATE TABLE items (id int, name text, note text DEFAULT 'copied')")
    dst.execute("CREATE TABLE log (what text)")
    dst.execute("INSERT INTO items VALUES (100, 'gone', 'old')")
    a = dst.address
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[warehouse]\nhost={a.host}\nport={a.port}\nuser={a.user}\n"
                        f"dbname={dst.name}\n")
    done = copyman("copy", dsn(src), "SELECT id, name FROM items", "service=warehouse", "items",
                   "--columns", "id, name", "--preoperator", "DELETE FROM items WHERE id = 100",
                   "--postoperator", "INSERT INTO log VALUES ('loaded')", "--json",
                   password=src.address.password, PGSERVICEFILE=str(services))
    assert done.status == 0, done.stderr
    [entry] = done.report["destinations"]
    assert (entry["conn_id"], entry["status"], entry["rows"]) == ("service=warehouse", "loaded", 3)
    assert dst.execute("SELECT id, name, note FROM items ORDER BY id") == [
        (1, "one", "copied"), (2, "two", "copied"), (3, "three", "copied")
    ]
    assert dst.execute("SELECT what FROM log") == [("loaded",)]
