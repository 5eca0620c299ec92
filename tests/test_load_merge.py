"""``mode="merge"`` (issue 15) through ``load.run``, without Airflow, on real servers: NULL
keys are refused (or matched, ``key_nulls="match"``), a rerun changes nothing, a concurrent
writer's key is a transient failure, and ``verify="checksum"`` reads the target after the
merge."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from exact_support import has_icu

from airflow_copyman import load
from tests.conftest import Database
from tests.test_readback import endpoint


def merge_into(
    source_db: Database,
    dest_db: Database,
    sql: str,
    *destinations: dict[str, Any],
    **kwargs: Any,
) -> load.TransferReport:
    """``load.run`` of ``sql`` into ``dest_db``'s tables, as the ``dst`` endpoint."""
    return load.run(
        endpoint(source_db, "src"), sql,
        [{"conn_id": "dst", "mode": "merge", "key": ["id"], **d} for d in destinations],
        endpoints={"dst": endpoint(dest_db, "dst")}, **kwargs,
    )


def versions(db: Database, table: str) -> list[tuple[Any, ...]]:
    """Every row's place and xmin: a rewritten row shows a new version."""
    return db.execute(f"SELECT ctid::text, xmin::text FROM {table} ORDER BY ctid")


def wait_for_lock(db: Database, statement: str) -> None:
    """Until a session of ``db`` waits for a lock in a ``statement`` (the merge's)."""
    deadline = time.monotonic() + 10
    while not db.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND starts_with(query, %s)", [statement]
    ):
        assert time.monotonic() < deadline, f"the merge's {statement} never waited"
        time.sleep(0.05)


# key_nulls


def test_a_null_key_fails_the_destination_permanently_and_writes_nothing(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items (id int, region text, v text); INSERT INTO items "
                      "VALUES (1, 'eu', 'a'), (NULL, 'eu', 'b'), (NULL, NULL, 'c'), (4, NULL, 'd')")
    dest_db.execute("CREATE TABLE items (id int, region text, v text);"
                    "INSERT INTO items VALUES (1, 'eu', 'old');"
                    "CREATE TABLE plain (id int, region text, v text)")
    report = merge_into(
        source_db, dest_db, "items",
        {"table": "items", "key": ["id", "region"]},
        {"table": "plain", "mode": "append", "key": None},
    )
    merged, plain = report.destinations
    assert (merged.status, merged.permanent) == ("failed", True), merged
    assert "NullKeyError" in (merged.error or "")
    assert "3 row(s) of the source have a NULL in the merge key (id: 2, region: 2)" in (
        merged.error or ""
    )
    assert "nothing was written" in (merged.error or "")
    assert dest_db.execute("SELECT * FROM items") == [(1, "eu", "old")]  # untouched
    assert (plain.status, plain.rows) == ("loaded", 4)  # the other destination commits


def test_key_nulls_is_refused_at_parse_time_when_wrong() -> None:
    base = {"conn_id": "dst", "table": "t", "mode": "merge", "key": ["id"]}
    with pytest.raises(load.ConfigError, match="'key_nulls' must be one of 'refuse', 'match'"):
        load.destinations_from([{**base, "key_nulls": "ignore"}])
    with pytest.raises(load.ConfigError, match="'key_nulls' is for mode='merge'"):
        load.destinations_from([{"conn_id": "dst", "table": "t", "key_nulls": "match"}])
    (parsed,) = load.destinations_from([{**base, "key_nulls": " Match "}])
    assert parsed.key_nulls == "match" and parsed.as_mapping()["key_nulls"] == "match"
    (default,) = load.destinations_from([base])
    assert default.key_nulls == "refuse"
    # A template is checked once rendered.
    (later,) = load.destinations_from([{**base, "key_nulls": "{{ params.n }}"}], rendered=False)
    assert later.key_nulls == "{{ params.n }}"


def test_null_keys_match_as_equal_and_a_rerun_leaves_the_table_unchanged(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items (id int, region text, v text); INSERT INTO items "
                      "VALUES (1, 'eu', 'a'), (NULL, 'eu', 'b'), (NULL, NULL, 'c'), (4, NULL, 'd')")
    dest_db.execute("CREATE TABLE items (id int, region text, v text);"
                    "INSERT INTO items VALUES (NULL, 'eu', 'old')")
    match = {"table": "items", "key": ["id", "region"], "key_nulls": "match"}
    created = {**match, "table": "made", "create": "if_missing"}
    first = merge_into(source_db, dest_db, "items", match, created, verify="checksum")
    assert [(d.status, d.inserted, d.updated) for d in first.destinations] == [
        ("loaded", 3, 1), ("loaded", 4, 0)
    ], first
    expected = [(None, None, "c"), (None, "eu", "b"), (1, "eu", "a"), (4, None, "d")]
    table_rows = "SELECT * FROM {} ORDER BY id NULLS FIRST, region NULLS FIRST"
    assert dest_db.execute(table_rows.format("items")) == expected
    assert dest_db.execute(table_rows.format("made")) == expected
    # create="if_missing": a unique key whose NULLs are equal (a primary key forbids them).
    assert dest_db.scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'made'::regclass"
    ) == "UNIQUE NULLS NOT DISTINCT (id, region)"
    before = versions(dest_db, "items"), versions(dest_db, "made")

    again = merge_into(source_db, dest_db, "items", match, created, verify="checksum")
    assert [(d.status, d.inserted, d.updated) for d in again.destinations] == [
        ("loaded", 0, 0), ("loaded", 0, 0)
    ], again
    assert (versions(dest_db, "items"), versions(dest_db, "made")) == before

    # Two NULL keys alike are one key twice: refused, as any duplicate key.
    source_db.execute("INSERT INTO items VALUES (NULL, NULL, 'twice')")
    (twice,) = merge_into(source_db, dest_db, "items", match).destinations
    assert (twice.status, twice.permanent) == ("failed", True), twice
    assert "DuplicateKeyError" in (twice.error or "")
    assert "(id, region)=(null, null)" in (twice.error or "")


# Unchanged rows are not rewritten.

TRIGGERED = """
CREATE TABLE fired (id int);
CREATE FUNCTION note_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO fired VALUES (NEW.id); RETURN NEW; END $$;
CREATE TRIGGER note_update AFTER UPDATE ON items FOR EACH ROW EXECUTE FUNCTION note_update();
"""


def test_a_rerun_rewrites_nothing_and_updated_counts_only_changed_rows(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    # json has no equality operator; numeric's and float8's equality ignore the spelling
    # (1.0 = 1.00, 0 = -0): each must still be seen changed when its value's form changes.
    columns = "id int PRIMARY KEY, j json, n numeric, f float8, acl aclitem, v text"
    source_db.execute(f"CREATE TABLE items ({columns}); INSERT INTO items "
                      "SELECT g, json_build_object('g', g), g * 1.0, g, "
                      "format('%s=r/%s', current_user, current_user)::aclitem, 'v' || g "
                      "FROM generate_series(1, 50) g")
    dest_db.execute(f"CREATE TABLE items ({columns}); " + TRIGGERED)
    # aclitem travels in text only (no binary I/O).
    options: dict[str, Any] = {"verify": "checksum", "format": "text"}
    ledger = load.Ledger(None, load.TaskKey("dag", "task", "run", -1, "lineage", 1))
    first = merge_into(source_db, dest_db, "items", {"table": "items"}, ledger=ledger, **options)
    (result,) = first.destinations
    assert (result.status, result.inserted, result.updated) == ("loaded", 50, 0), result
    before = versions(dest_db, "items")

    for _ in range(2):
        (again,) = merge_into(source_db, dest_db, "items", {"table": "items"},
                              **options).destinations
        assert (again.status, again.inserted, again.updated) == ("loaded", 0, 0), again
    assert versions(dest_db, "items") == before  # not one row version more
    assert dest_db.scalar("SELECT count(*) FROM fired") == 0

    source_db.execute("UPDATE items SET n = 2.00 WHERE id = 2;"   # same value, other scale
                      "UPDATE items SET f = '-0' WHERE id = 3;"   # 0 = -0 for float8
                      "UPDATE items SET f = 0 WHERE id = 4;"
                      "UPDATE items SET j = '{\"g\":5}' WHERE id = 5;"  # json spelling
                      "UPDATE items SET acl = format('%s=rw/%s', current_user, current_user)"
                      "::aclitem WHERE id = 6;"  # aclitem: no send function, compared as text
                      "UPDATE items SET v = NULL WHERE id = 7")
    dest_db.execute("UPDATE items SET f = 0 WHERE id = 3; TRUNCATE fired")
    ledger = load.Ledger(None, load.TaskKey("dag", "task", "run2", -1, "lineage", 1))
    (changed,) = merge_into(source_db, dest_db, "items", {"table": "items"}, ledger=ledger,
                            **options).destinations
    assert (changed.status, changed.inserted, changed.updated) == ("loaded", 0, 6), changed
    assert dest_db.execute("SELECT id FROM fired ORDER BY id") == [(i,) for i in range(2, 8)]
    assert dest_db.execute("SELECT n::text, f::text FROM items WHERE id IN (2, 3) ORDER BY id"
                           ) == [("2.00", "2"), ("3.0", "-0")]
    # The ledger keeps the counts the report gives.
    assert dest_db.execute(
        "SELECT run_id, inserted, updated FROM copyman_ledger ORDER BY run_id"
    ) == [("run", 50, 0), ("run2", 0, 6)]


# A concurrent writer.


def test_a_key_a_concurrent_writer_inserted_fails_transient_and_a_retry_merges_it(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items (id int, v text); "
                      "INSERT INTO items SELECT g, 'new' FROM generate_series(1, 5) g")
    dest_db.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    writer = dest_db.connect()
    writer.execute("INSERT INTO items VALUES (3, 'theirs')")  # open transaction
    outcome: list[load.TransferReport] = []
    loading = threading.Thread(
        target=lambda: outcome.append(merge_into(source_db, dest_db, "items", {"table": "items"}))
    )
    loading.start()
    wait_for_lock(dest_db, "INSERT")
    writer.commit()
    writer.close()
    loading.join(30)
    (result,) = outcome[0].destinations
    assert (result.status, result.permanent) == ("failed", False), result
    assert "MergeConflictError" in (result.error or "")
    assert "a concurrent writer inserted a key" in (result.error or "")
    assert "a retry merges it" in (result.error or "")
    assert dest_db.execute("SELECT * FROM items") == [(3, "theirs")]

    (retried,) = merge_into(source_db, dest_db, "items", {"table": "items"}).destinations
    assert (retried.status, retried.inserted, retried.updated) == ("loaded", 4, 1), retried
    assert dest_db.scalar("SELECT count(*) FROM items WHERE v = 'new'") == 5


def test_a_deadlock_with_a_concurrent_writer_fails_transient(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items (id int, v text); "
                      "INSERT INTO items VALUES (1, 'new'), (2, 'new')")
    # The merge's session looks for the deadlock after 1 s (the default), the writer's only
    # after 60 s: the merge is the one the server aborts.
    dest_db.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
                    "INSERT INTO items VALUES (1, 'old'), (2, 'old')")
    writer = dest_db.connect()
    writer.execute("SET deadlock_timeout = '60s'")
    writer.execute("UPDATE items SET v = 'theirs' WHERE id = 2")  # holds row 2
    outcome: list[load.TransferReport] = []
    loading = threading.Thread(target=lambda: outcome.append(
        merge_into(source_db, dest_db, "SELECT * FROM items ORDER BY id", {"table": "items"})
    ))
    loading.start()
    wait_for_lock(dest_db, "UPDATE")  # the merge holds row 1, waits for row 2
    writer.execute("UPDATE items SET v = 'theirs' WHERE id = 1")  # waits for the merge
    writer.commit()
    writer.close()
    loading.join(30)
    (result,) = outcome[0].destinations
    assert (result.status, result.permanent) == ("failed", False), result
    assert "MergeConflictError" in (result.error or "") and "deadlock" in (result.error or "")
    assert "a retry merges it" in (result.error or "")
    assert dest_db.execute("SELECT v FROM items ORDER BY id") == [("theirs",), ("theirs",)]


def test_another_unique_column_violated_stays_permanent(pair: tuple[Database, Database]) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items (id int, code text); INSERT INTO items VALUES (2, 'x')")
    dest_db.execute("CREATE TABLE items (id int PRIMARY KEY, code text UNIQUE);"
                    "INSERT INTO items VALUES (1, 'x')")
    (result,) = merge_into(source_db, dest_db, "items", {"table": "items"}).destinations
    assert (result.status, result.permanent) == ("failed", True), result
    assert "UniqueViolation" in (result.error or "") and "items_code_key" in (result.error or "")


# verify="checksum" reads the target.


def test_a_trigger_that_changes_a_merged_row_fails_the_checksum(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items (id int, v text); "
                      "INSERT INTO items SELECT g, 'new' FROM generate_series(1, 5) g")
    dest_db.execute(
        "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (2, 'old');"
        "CREATE FUNCTION shout() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN NEW.v := upper(NEW.v); RETURN NEW; END $$;"
        "CREATE TRIGGER shout BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION shout();"
        "CREATE TABLE other (id int PRIMARY KEY, v text); INSERT INTO other VALUES (2, 'old')"
    )
    report = merge_into(
        source_db, dest_db, "items", {"table": "items"},
        # The postoperator runs after the checksum: what it changes is not compared.
        {"table": "other", "postoperator": "UPDATE other SET v = 'post' WHERE id = 1"},
        verify="checksum",
    )
    shouted, other = report.destinations
    assert (shouted.status, shouted.permanent) == ("failed", True), shouted
    assert "ChecksumMismatch" in (shouted.error or "")
    assert dest_db.execute("SELECT * FROM items") == [(2, "old")]
    assert (other.status, other.inserted, other.updated) == ("loaded", 4, 1), other
    assert dest_db.scalar("SELECT v FROM other WHERE id = 1") == "post"


def test_a_nondeterministic_collation_matching_another_key_fails_the_checksum(
    pair: tuple[Database, Database],
) -> None:
    source_db, dest_db = pair
    if not has_icu(dest_db):
        pytest.skip("this server is built without ICU (the embedded 18): no such collation")
    source_db.execute("CREATE TABLE items (id text, v int); INSERT INTO items VALUES ('ABC', 2)")
    dest_db.execute(
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);"
        "CREATE TABLE items (id text COLLATE ci PRIMARY KEY, v int);"
        "INSERT INTO items VALUES ('abc', 1)"
    )
    (result,) = merge_into(source_db, dest_db, "items", {"table": "items"},
                           verify="checksum").destinations
    assert (result.status, result.permanent) == ("failed", True), result
    assert "ChecksumMismatch" in (result.error or "")
    assert dest_db.execute("SELECT * FROM items") == [("abc", 1)]


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_a_merge_reads_back_inserted_updated_and_unchanged_rows(
    pair: tuple[Database, Database], fmt: str
) -> None:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items (id int, v text, at timestamptz); INSERT INTO items "
                      "SELECT g, 'v' || g, '2024-01-01'::timestamptz + g * interval '1 hour' "
                      "FROM generate_series(1, 300) g")
    # 1-100 unchanged, 101-200 changed, 201-300 new; 301-310 not in the source.
    dest_db.execute("CREATE TABLE items (id int, v text, at timestamptz); INSERT INTO items "
                    "SELECT g, CASE WHEN g <= 100 THEN 'v' || g ELSE 'old' END, "
                    "'2024-01-01'::timestamptz + g * interval '1 hour' "
                    "FROM generate_series(1, 200) g UNION ALL "
                    "SELECT g, 'kept', NULL FROM generate_series(301, 310) g;"
                    "CREATE TABLE wide (id bigint, v text, at timestamptz);"
                    "INSERT INTO wide SELECT id, v, at FROM items")
    # Binary needs the same types on both sides: wide (bigint) only in text and CSV.
    tables = [{"table": "items"}] + ([{"table": "wide"}] if fmt != "binary" else [])
    report = merge_into(source_db, dest_db, "items", *tables, verify="checksum", format=fmt)
    for result in report.destinations:
        assert (result.status, result.inserted, result.updated) == ("loaded", 100, 100), result
    methods = [(d.checksum or "").split(":")[:2] for d in report.destinations]
    assert methods == [["300", f"copy-{fmt}"], ["300", "row-text"]][: len(tables)]
    assert dest_db.scalar("SELECT count(*) FROM items WHERE v = 'kept'") == 10
