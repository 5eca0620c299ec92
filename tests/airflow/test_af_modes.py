"""Load modes (issue 10): append, replace (truncate, delete), merge, create if missing,
postoperator and min_rows, through CopyManHook.transfer (and dag.test() where Airflow's
retries are the point) on real servers."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from af_support import Database, PgServers, run_dag
from exact_support import (
    USER_TYPES_DDL,
    checker,
    create_types,
    differences,
    dumps,
    type_names,
)

from airflow_copyman._outcome import CopyManDestinationsFailed, CopyManPermanentFailure
from airflow_copyman.hooks.copyman import (
    CopyManConfigError,
    CopyManHook,
    Destination,
    destinations_from,
)

pytestmark = pytest.mark.usefixtures("airflow_db")


def point(monkeypatch: pytest.MonkeyPatch, **databases: Database) -> None:
    for conn_id, db in databases.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", db.uri())


def transfer(sql: str, *destinations: Destination, **kwargs: Any) -> Any:
    kwargs.setdefault("raise_on_failure", False)
    return CopyManHook("pg_m_src").transfer(sql, list(destinations), **kwargs)


@pytest.fixture
def pair(pg: PgServers, monkeypatch: pytest.MonkeyPatch) -> tuple[Database, Database]:
    src, dst = pg.database(pg.src, "msrc"), pg.database(pg.dst1, "mdst")
    point(monkeypatch, pg_m_src=src, pg_m_dst=dst)
    return src, dst


# Merge.


def test_merge_updates_inserts_and_leaves_the_other_rows(
    pair: tuple[Database, Database],
) -> None:
    src, dst = pair
    src.execute("CREATE TABLE items (id int, v text); "
                "INSERT INTO items SELECT g, 'new ' || g FROM generate_series(3, 6) g")
    # No unique index on the key; a column the source lacks keeps its default.
    dst.execute("CREATE TABLE items (id int, v text, note text DEFAULT 'kept'); "
                "INSERT INTO items SELECT g, 'old ' || g, 'old' FROM generate_series(1, 4) g")
    report = transfer("items", Destination("pg_m_dst", "items", mode="merge", key=("id",)))
    (result,) = report.destinations
    assert (result.status, result.rows, result.inserted, result.updated) == ("loaded", 4, 2, 2)
    assert result.as_dict()["inserted"] == 2 and result.as_dict()["updated"] == 2
    assert dst.execute("SELECT id, v, note FROM items ORDER BY id") == [
        (1, "old 1", "old"), (2, "old 2", "old"),             # absent from the source: stay
        (3, "new 3", "old"), (4, "new 4", "old"),             # updated
        (5, "new 5", "kept"), (6, "new 6", "kept"),           # inserted, defaults
    ]


def test_merge_refuses_a_key_twice_in_the_source_and_writes_nothing(
    pair: tuple[Database, Database],
) -> None:
    src, dst = pair
    src.execute("CREATE TABLE items (id int, v text); "
                "INSERT INTO items VALUES (1, 'a'), (7, 'b'), (7, 'c')")
    dst.execute("CREATE TABLE items (id int, v text); INSERT INTO items VALUES (1, 'old')")
    report = transfer("items", Destination("pg_m_dst", "items", mode="merge", key=["id"]))
    (result,) = report.destinations
    assert result.status == "failed" and result.permanent, result
    assert "merge key (id) occurs more than once" in (result.error or "")
    assert "Key (id)=(7) is duplicated" in (result.error or "")
    assert dst.execute("SELECT * FROM items") == [(1, "old")]


# Replace.


@pytest.mark.parametrize("replace_with", ["truncate", "delete"])
def test_replace_failing_mid_load_keeps_the_old_rows(
    pair: tuple[Database, Database], replace_with: str
) -> None:
    src, dst = pair
    src.execute("CREATE TABLE nums AS SELECT g AS id FROM generate_series(1, 50000) g")
    # A row near the end breaks the check: the COPY fails after most rows went in.
    dst.execute("CREATE TABLE nums (id int CHECK (id < 49000)); INSERT INTO nums VALUES (-1)")
    report = transfer(
        "nums", Destination("pg_m_dst", "nums", mode="replace", replace_with=replace_with)
    )
    (result,) = report.destinations
    assert result.status == "failed" and "CheckViolation" in (result.error or ""), result
    assert dst.execute("SELECT * FROM nums") == [(-1,)]
    # The same load without the failing rows replaces the table.
    good = transfer(
        "SELECT id FROM nums WHERE id < 100",
        Destination("pg_m_dst", "nums", mode="replace", replace_with=replace_with),
    )
    assert good.destinations[0].status == "loaded"
    assert dst.scalar("SELECT count(*) FROM nums") == 99


def test_replace_by_truncate_writes_its_rows_frozen(pair: tuple[Database, Database]) -> None:
    """TRUNCATE and COPY in one transaction: the COPY runs with FREEZE (every page of the
    new table all-frozen at once, no later anti-wraparound rewrite)."""
    src, dst = pair
    src.execute("CREATE TABLE nums AS SELECT g AS id FROM generate_series(1, 5000) g")
    dst.execute("CREATE EXTENSION IF NOT EXISTS pg_visibility; CREATE TABLE nums (id int); "
                "INSERT INTO nums VALUES (-1)")
    report = transfer("nums", Destination("pg_m_dst", "nums", truncate=True))
    assert report.destinations[0].status == "loaded"
    pages, frozen = dst.execute("SELECT relpages, all_frozen FROM pg_class, "
                                "pg_visibility_map_summary('nums') WHERE relname = 'nums'")[0]
    assert frozen > 0 and dst.scalar("SELECT count(*) FROM nums") == 5000, (pages, frozen)


def test_truncate_true_is_replace(pair: tuple[Database, Database]) -> None:
    spec = Destination.from_value({"conn_id": "c", "table": "t", "truncate": True}, 0)
    assert (spec.mode, spec.replace_with) == ("replace", "truncate")


def test_a_reader_keeps_reading_the_old_rows_during_a_replace_by_delete(
    pair: tuple[Database, Database],
) -> None:
    src, dst = pair
    src.execute("CREATE TABLE nums AS SELECT g AS id FROM generate_series(1, 1000) g")
    dst.execute("CREATE TABLE nums (id int); INSERT INTO nums VALUES (1), (2), (3)")
    # The postoperator holds the load transaction open, after the DELETE and the COPY.
    spec = Destination("pg_m_dst", "nums", mode="replace", replace_with="delete",
                       postoperator="SELECT pg_sleep(3)")
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(transfer("nums", spec)))
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while not dst.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                             "current_database() AND query LIKE 'SELECT pg_sleep(3)%%'"):
            assert time.monotonic() < deadline, "the load never reached its postoperator"
            time.sleep(0.05)
        with dst.connect(autocommit=True) as reader:
            reader.execute("SET lock_timeout = '500ms'")
            started = time.monotonic()
            assert reader.execute("SELECT count(*) FROM nums").fetchone() == (3,)
            assert time.monotonic() - started < 0.5
    finally:
        worker.join(60)
    assert outcome and outcome[0].destinations[0].status == "loaded"
    assert dst.scalar("SELECT count(*) FROM nums") == 1000


# Create if missing.


def _types_of(db: Database, table: str) -> list[tuple[str, str]]:
    """Each column's type as a table of base types would declare it (domains resolved)."""
    return [tuple(r) for r in db.execute(  # type: ignore[misc]
        "SELECT a.attname::text, format_type("
        "  CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END,"
        "  CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END) "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY a.attnum", [table])]


def test_create_if_missing_every_type_of_the_mixed_table(
    pair: tuple[Database, Database],
) -> None:
    src, dst = pair
    create_types(src, fill=True)
    dst.execute(USER_TYPES_DDL)
    dst.execute("CREATE SCHEMA wh")
    report = transfer(
        "types",
        Destination("pg_m_dst", "wh.created", create="if_missing"),
        Destination("pg_m_dst", "merged", create="if_missing", mode="merge", key=["id"]),
    )
    assert [(d.status, d.rows) for d in report.destinations] == [("loaded", 4)] * 2, report
    expected = _types_of(src, "types")
    assert ("n_scaled", "numeric(20,10)") in expected and ("dom", "integer") in expected
    assert _types_of(dst, "wh.created") == expected
    assert _types_of(dst, "merged") == expected
    assert dst.scalar("SELECT count(*) FROM pg_index WHERE indrelid = 'merged'::regclass "
                      "AND indisprimary") == 1
    with checker(src) as a, checker(dst) as b:
        assert differences(dumps(a, "types", type_names()),
                           dumps(b, "wh.created", type_names())) == []


def test_create_if_missing_names_columns_as_given(pair: tuple[Database, Database]) -> None:
    src, dst = pair
    src.execute("CREATE TABLE items AS SELECT 1 AS a, 'x'::varchar(5) AS b")
    report = transfer("items", Destination("pg_m_dst", "named", create="if_missing",
                                           columns=("Id", "Name")))
    assert report.destinations[0].status == "loaded", report
    assert _types_of(dst, "named") == [("Id", "integer"), ("Name", "character varying(5)")]
    assert dst.execute('SELECT "Id", "Name" FROM named') == [(1, "x")]


def test_create_if_missing_never_creates_a_schema(pair: tuple[Database, Database]) -> None:
    src, dst = pair
    src.execute("CREATE TABLE items (id int)")
    with pytest.raises(CopyManConfigError, match="schema 'nowhere'") as info:
        transfer("items", Destination("pg_m_dst", "nowhere.items", create="if_missing"))
    assert "creates tables, not schemas" in str(info.value)
    assert dst.scalar("SELECT to_regnamespace('nowhere') IS NULL")


def test_a_source_column_without_a_namesake_is_an_error(
    pair: tuple[Database, Database],
) -> None:
    src, dst = pair
    src.execute("CREATE TABLE items (id int, v text, extra int)")
    dst.execute("CREATE TABLE items (id int, v text, a int, b int)")
    with pytest.raises(CopyManConfigError, match="the source's column 'extra' has no "
                       "destination column of that name"):
        transfer("items", Destination("pg_m_dst", "items"))


# Postoperator and min_rows.


def test_a_postoperator_is_rolled_back_with_a_failed_load(
    pair: tuple[Database, Database],
) -> None:
    src, dst = pair
    src.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 10) g")
    # A deferred constraint trigger fails the commit, after the postoperator ran.
    dst.execute("""
        CREATE TABLE items (id int); CREATE TABLE audit (n int);
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
        CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON audit DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION refuse();
    """)
    spec = Destination("pg_m_dst", "items",
                       postoperator=["INSERT INTO audit SELECT count(*) FROM items"])
    report = transfer("items", spec)
    (result,) = report.destinations
    assert result.status == "failed" and "refused at commit" in (result.error or ""), result
    assert dst.execute("SELECT count(*) FROM items") == [(0,)]
    assert dst.execute("SELECT count(*) FROM audit") == [(0,)]
    dst.execute("DROP TRIGGER refuse ON audit")
    assert transfer("items", spec).destinations[0].status == "loaded"
    assert dst.execute("SELECT n FROM audit") == [(10,)]  # after the COPY, in its transaction


def test_min_rows_fails_a_short_source_with_nothing_committed(
    pair: tuple[Database, Database], pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = pair
    other = pg.database(pg.dst2, "mdst2")
    point(monkeypatch, pg_m_dst2=other)
    src.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 3) g")
    for db in (dst, other):
        db.execute("CREATE TABLE items (id int)")
    with pytest.raises(CopyManDestinationsFailed) as info:
        CopyManHook("pg_m_src").transfer(
            "items", [Destination("pg_m_dst", "items"), Destination("pg_m_dst2", "items")],
            min_rows=10,
        )
    assert not isinstance(info.value, CopyManPermanentFailure)  # late data may come
    assert "yielded 3 row(s), fewer than min_rows=10" in str(info.value)
    for db in (dst, other):
        assert db.scalar("SELECT count(*) FROM items") == 0


# Arguments.


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"mode": 1}, "'mode' must be one of 'append', 'replace', 'merge', got int"),
        ({"mode": "upsert"}, "'mode' must be one of"),
        ({"mode": "replace", "replace_with": "drop"}, "'replace_with' must be one of"),
        ({"replace_with": "delete"}, "'replace_with' is for mode='replace'"),
        ({"mode": "merge"}, "mode='merge' needs 'key'"),
        # A string is one column's name; the text of a list is that list (issue 15).
        ({"mode": "merge", "key": "['id', 2]"}, "render_template_as_native_obj=True"),
        ({"mode": "merge", "key": 5}, "'key' must be a list of column names, got int"),
        ({"mode": "merge", "key": []}, "columns is empty"),
        ({"key": ["id"]}, "'key' is for mode='merge'"),
        ({"mode": "merge", "key": ["id"], "truncate": True}, "'truncate' is a shorthand"),
        ({"create": True}, "'create' must be one of 'never', 'if_missing', got bool"),
        ({"postoperator": 5}, "'postoperator' must be SQL or a list of SQL"),
        ({"postoperator": ["ANALYZE", None]}, "'postoperator' must be SQL"),
    ],
)
def test_wrong_values_of_the_destination_options_fail_at_parse_time(
    extra: dict[str, Any], message: str
) -> None:
    from airflow_copyman.operators.copyman import CopyManOperator

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CopyManOperator(task_id="t", source_conn_id="s", sql="t",
                        destinations=[{"conn_id": "d", "table": "t", **extra}])


@pytest.mark.parametrize("value", [-1, "many", True, 1.5])
def test_wrong_min_rows_fails_at_parse_time(value: Any) -> None:
    from airflow_copyman.operators.copyman import CopyManOperator

    with pytest.raises(ValueError, match="min_rows must be"):
        CopyManOperator(task_id="t", source_conn_id="s", sql="t",
                        destinations=[{"conn_id": "d", "table": "t"}], min_rows=value)


def test_templated_options_are_checked_after_rendering() -> None:
    from airflow_copyman.operators.copyman import CopyManOperator

    # Templates pass at parse time ...
    CopyManOperator(task_id="t", source_conn_id="s", sql="t", destinations=[
        {"conn_id": "d", "table": "t", "mode": "{{ params.mode }}", "create": "{{ x }}"}
    ])
    # ... and their rendered values are checked like the others.
    with pytest.raises(CopyManConfigError, match="'mode' must be one of"):
        destinations_from([{"conn_id": "d", "table": "t", "mode": "upsert"}])


# A merge destination whose backend dies mid-load: the retry applies it exactly once.

KILL_ONCE = """
CREATE SEQUENCE kill_once;
CREATE TABLE applied (id int);
CREATE FUNCTION kill_me() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO applied VALUES (NEW.id);
    -- A sequence is not transactional: only the first try's backend dies.
    IF NEW.id = 2500 AND nextval('kill_once') = 1 THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER kill_me BEFORE INSERT OR UPDATE ON items FOR EACH ROW
    EXECUTE FUNCTION kill_me();
"""


def test_a_merge_retried_after_its_backend_died_applies_once(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = pg.database(pg.src, "mrsrc"), pg.database(pg.dst1, "mrdst")
    src.execute("CREATE TABLE items AS SELECT g AS id, 'new ' || g AS v "
                "FROM generate_series(1, 3000) g")
    dst.execute("CREATE TABLE items (id int, v text); "
                "INSERT INTO items SELECT g, 'old' FROM generate_series(1, 300) g")
    dst.execute(KILL_ONCE)
    point(monkeypatch, pg_src=src, pg_d1=dst)

    run = run_dag("copyman_test_dags.py", "copyman_test_merge_retry")

    assert run.tis["merge_retry"] == ("success", 2)
    (result,) = run.xcom("merge_retry")["destinations"]
    assert (result["status"], result["inserted"], result["updated"]) == ("loaded", 2700, 300)
    assert dst.execute("SELECT count(*), count(DISTINCT id), min(v) FROM items") == [
        (3000, 3000, "new 1")
    ]
    # Every source row applied by exactly one committed try.
    assert dst.execute("SELECT count(*), count(DISTINCT id) FROM applied") == [(3000, 3000)]
    assert dst.execute("SELECT try_number FROM copyman_ledger") == [(2,)]
