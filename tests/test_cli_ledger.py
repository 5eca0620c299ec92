"""``copyman --load-id``: a rerun with the same id loads only the destinations it has not
loaded yet (the ledger in each destination database), so a cron retry is exactly once."""

from __future__ import annotations

import itertools
from pathlib import Path

from af_support import Database

from airflow_copyman.testing.servers import create_database
from tests.cli_support import copyman, dsn

_names = itertools.count()


def new_db(server: object, prefix: str) -> Database:
    name = f"cli_{prefix}_{next(_names)}"
    create_database(server.address, name)  # type: ignore[attr-defined]
    return Database(server, name)  # type: ignore[arg-type]


def test_a_rerun_with_the_same_load_id_loads_only_what_failed(
    server: object, tmp_path: Path
) -> None:
    src, good, bad = (new_db(server, p) for p in ("src", "good", "bad"))
    src.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 10) g")
    good.execute("CREATE TABLE items (id int)")
    bad.execute("CREATE TABLE items (id int CONSTRAINT small CHECK (id < 5))")
    loadfile = tmp_path / "items.toml"
    loadfile.write_text(
        f'source = "{dsn(src)}"\nsql = "items"\nload_id = "items-2026-12-07"\n'
        f'[[destinations]]\ndsn = "{dsn(good)}"\ntable = "items"\n'
        f'[[destinations]]\ndsn = "{dsn(bad)}"\ntable = "items"\n'
    )
    password = src.address.password

    first = copyman("run", str(loadfile), "--json", "-q", password=password)
    assert first.status == 1
    assert [d["status"] for d in first.report["destinations"]] == ["loaded", "failed"]

    bad.execute("ALTER TABLE items DROP CONSTRAINT small")
    second = copyman("run", str(loadfile), "--json", "-q", password=password)
    assert (second.status, second.stderr) == (0, "")
    assert [(d["status"], d["rows"]) for d in second.report["destinations"]] == [
        ("already_loaded", 10), ("loaded", 10)
    ]
    # Appended once each: the first destination was not loaded again.
    assert good.scalar("SELECT count(*) FROM items") == 10
    assert bad.scalar("SELECT count(*) FROM items") == 10

    # Another id is another load: both again. The command line's id wins over the file's.
    third = copyman("run", str(loadfile), "--json", "-q", "--load-id", "items-again",
                    password=password)
    assert [d["status"] for d in third.report["destinations"]] == ["loaded", "loaded"]
    assert good.scalar("SELECT count(*) FROM items") == 20

    # copy takes --load-id too.
    again = [copyman("copy", dsn(src), "items", dsn(good), "items", "--load-id", "one", "--json",
                     password=password) for _ in range(2)]
    assert [a.report["destinations"][0]["status"] for a in again] == ["loaded", "already_loaded"]
    assert good.scalar("SELECT count(*) FROM items") == 30
