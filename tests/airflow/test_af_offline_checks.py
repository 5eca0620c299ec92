"""Fast checks without servers or task runs: parsing, classification, lineage, packaging."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_copyman import copyman
from airflow_copyman.load.catalog import estimates, hints, tables
from airflow_copyman.load.catalog.tables import Column, Source, TableName
from airflow_copyman.load.connection import classify


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("orders", TableName(None, "orders")),
        ("Orders", TableName(None, "orders")),
        ("public.orders", TableName("public", "orders")),
        (' "Sales" . "Big Orders" ', TableName("Sales", "Big Orders")),
        ('analytics."x""y";', TableName("analytics", 'x"y')),
        ("select", None),
        ("SELECT * FROM orders", None),
        ("TABLE orders", None),
        ("a.b.c", None),
        ("orders where", None),
    ],
)
def test_table_names(text: str, expected: TableName | None) -> None:
    assert TableName.parse(text) == expected


def test_source_statements() -> None:
    table = Source.parse("public.orders")
    assert table.table == TableName("public", "orders")
    # A table is read with SELECT (children and partitions included), of the described columns.
    columns = [Column("id", 20, "bigint", "b"), Column("Day", 1082, "date", "b")]
    assert table.copy_out("binary", columns).as_string() == (
        'COPY (\nSELECT "id", "Day" FROM "public"."orders"\n) TO STDOUT (FORMAT binary)'
    )
    query = Source.parse("SELECT 1 AS a -- trailing comment\n;;  ")
    assert query.query == "SELECT 1 AS a -- trailing comment"
    assert query.copy_out("csv", columns).as_string() == (
        "COPY (\nSELECT 1 AS a -- trailing comment\n) TO STDOUT (FORMAT csv)"
    )
    statement = tables.copy_in(TableName("a", "T"), ["id", "x y"], "text")
    assert statement.as_string() == 'COPY "a"."T" ("id", "x y") FROM STDIN (FORMAT text)'


@pytest.mark.parametrize("text", ["COPY orders TO STDOUT", "  -- c\n copy (select 1) to stdout"])
def test_copy_statements_are_refused(text: str) -> None:
    with pytest.raises(tables.PlanError, match="not a COPY statement"):
        Source.parse(text)


def test_columns_and_formats() -> None:
    # Column names are names, as given: checked against the table when it is described.
    assert tables.parse_columns(["id", "Amount", "a b"], "t") == ["id", "Amount", "a b"]
    for bad in (["id", "id"], [], "id", [""], [" "], [3]):
        with pytest.raises(tables.PlanError):
            tables.parse_columns(bad, "t")  # type: ignore[arg-type]
    assert tables.normalize_format(None) is None
    assert tables.normalize_format("CSV") == "csv"
    with pytest.raises(tables.PlanError, match="format must be one of"):
        tables.normalize_format("parquet")


def test_column_names_resolve_exactly_then_as_sql_with_a_warning() -> None:
    available = ["Id", "id", "Amount", "x y"]
    assert hints.resolve_columns(["Id", "id", "x y"], available, "t") == ["Id", "id", "x y"]
    with pytest.warns(hints.CopyManDeprecationWarning, match="write the plain name 'Amount'"):
        assert hints.resolve_columns(['"Amount"'], available, "t") == ["Amount"]
    with pytest.raises(tables.PlanError, match=r"has no column 'amount' \(did you mean 'Amount'"):
        hints.resolve_columns(["amount"], available, "t")
    with pytest.raises(tables.PlanError, match="listed twice"), pytest.warns(
        hints.CopyManDeprecationWarning
    ):
        hints.resolve_columns(["Amount", '"Amount"'], available, "t")


def test_progress_notes() -> None:
    estimate = estimates.SizeEstimate(20_000, "table statistics")
    assert estimates.progress_note(None, 100, 1.0) == ""
    assert estimates.progress_note(estimate, 9_000, 10.0) == (
        ", ~45% of ~20,000 rows (estimate), ~12s left (estimate)"
    )
    assert estimates.progress_note(estimate, 2_000, 8.9) == (
        ", ~10% of ~20,000 rows (estimate), ~1m20s left (estimate)"
    )
    # Never 100% while the copy runs, and no time left once the estimate proves low.
    assert estimates.progress_note(estimate, 19_999, 60.0).startswith(", ~99% of")
    assert estimates.progress_note(estimate, 25_000, 60.0) == (
        ", ~99% (more rows than the ~20,000 estimated; time left unknown)"
    )
    assert [estimates.duration(s) for s in (0.4, 59.6, 80, 3600 * 2 + 300)] == [
        "0s", "1m00s", "1m20s", "2h05m",
    ]


def test_binary_only_for_identical_portable_types() -> None:
    int4 = Column("a", 23, "integer", "b")
    int8 = Column("a", 20, "bigint", "b")
    enum_src = Column("m", 16400, "mood", "e")
    enum_dst = Column("m", 16999, "mood", "e")
    composite = Column("c", 16500, "pair", "c")
    assert tables.binary_safe([int4, enum_src], [int4, enum_dst])
    assert not tables.binary_safe([int4], [int8])
    assert not tables.binary_safe([composite], [composite])
    assert not tables.binary_safe([int4], [int4, int4])
    assert tables.first_type_difference([int4], [int8]) == "a integer -> a bigint"


@pytest.mark.parametrize(
    ("exc", "permanent"),
    [
        (psycopg.errors.UndefinedTable("x"), True),
        (psycopg.errors.UndefinedColumn("x"), True),
        (psycopg.errors.InsufficientPrivilege("x"), True),
        (psycopg.errors.SyntaxError("x"), True),
        (psycopg.errors.InvalidTextRepresentation("x"), True),
        (psycopg.errors.CheckViolation("x"), True),
        (psycopg.errors.RaiseException("x"), True),
        (psycopg.errors.AdminShutdown("x"), False),
        (psycopg.errors.CrashShutdown("x"), False),
        (psycopg.errors.CannotConnectNow("x"), False),
        (psycopg.errors.SerializationFailure("x"), False),
        (psycopg.errors.DeadlockDetected("x"), False),
        (psycopg.errors.QueryCanceled("x"), False),
        (psycopg.errors.TooManyConnections("x"), False),
        (psycopg.OperationalError("consuming input failed: server closed the connection"), False),
        (psycopg.OperationalError('connection failed: FATAL:  password authentication '
                                  'failed for user "u"'), True),
        (psycopg.OperationalError('connection failed: FATAL:  database "x" does not exist'),
         True),
        (psycopg.ProgrammingError('invalid connection option "foo"'), True),
        (psycopg.OperationalError("connection failed: server does not support SSL, but SSL "
                                  "was required"), True),
        (copyman.RowCountMismatch("x"), True),
        (copyman.ReceiverTimeout("x"), False),
        (copyman.Cancelled("x"), False),
    ],
)
def test_classification(exc: BaseException, permanent: bool) -> None:
    assert classify.is_permanent(exc) is permanent


def test_describe_redacts_secrets() -> None:
    exc = psycopg.errors.RaiseException("leak p@ss/word!\nCONTEXT: line 2")
    text = classify.describe(exc, ["p@ss/word!"])
    assert text == "RaiseException [P0001]: leak ***"
    assert "p%40ss%2Fword%21" not in classify.redact("uri p%40ss%2Fword%21", ["p@ss/word!"])
    assert classify.redact("host=h password='x y' user=u", []) == "host=h password=*** user=u"


class DictStore:
    """What ``task_state_store`` offers, over a dict (Airflow's needs a task runner)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return json.loads(self.data[key]) if key in self.data else default

    def set(self, key: str, value: Any) -> None:
        self.data[key] = json.dumps(value)


def test_lineage_follows_max_tries() -> None:
    from airflow_copyman._task_state import TaskStateLedger
    from airflow_copyman.hooks.copyman import Destination, DestinationResult, TransferReport

    store = DictStore()
    first = TaskStateLedger(store, max_tries=3, resume_on_clear=False)
    dest = Destination("pg_a", "public.t")
    first.record(DestinationResult("pg_a", "public.t", "loaded", 10, 100, try_number=1), 1)
    # A retry (same max_tries) continues the lineage and sees what was loaded.
    retry = TaskStateLedger(store, max_tries=3, resume_on_clear=False)
    assert retry.lineage == first.lineage
    loaded = retry.loaded(dest)
    assert loaded is not None and loaded.status == "already_loaded" and loaded.rows == 10
    retry.sync(TransferReport(10, 100, "binary", 0.1, [loaded]), 2)
    # A clear raises max_tries: a new lineage, which loads everything again...
    cleared = TaskStateLedger(store, max_tries=5, resume_on_clear=False)
    assert cleared.lineage != first.lineage and cleared.loaded(dest) is None
    # ... unless asked to resume.
    store2 = DictStore()
    TaskStateLedger(store2, 3, resume_on_clear=False).record(
        DestinationResult("pg_a", "public.t", "loaded", 10, 100, try_number=1), 1
    )
    resumed = TaskStateLedger(store2, 5, resume_on_clear=True)
    assert resumed.loaded(dest) is not None
    # Without a store, the lineage comes from max_tries alone.
    assert TaskStateLedger(None, 3, resume_on_clear=False).lineage == "max_tries-3"


def test_the_mirror_keeps_what_the_loading_try_measured() -> None:
    from airflow_copyman._task_state import TaskStateLedger
    from airflow_copyman.hooks.copyman import Destination, DestinationResult, TransferReport

    store = DictStore()
    dest = Destination("pg_a", "public.t", mode="merge", key=("id",))
    # The ledger shows a load the store missed (try 1 died after its commit): try 2 syncs
    # it with what the ledger kept of try 1's measures.
    from_ledger = DestinationResult(
        "pg_a", "public.t", "already_loaded", 10, 100, try_number=1, mode="merge",
        inserted=7, updated=3, checksum="10:copy-binary:42",
    )
    TaskStateLedger(store, 3, resume_on_clear=False).sync(
        TransferReport(10, 100, "binary", 0.1, [from_ledger]), 2
    )
    loaded = TaskStateLedger(store, 3, resume_on_clear=False).loaded(dest)
    assert loaded is not None
    assert (loaded.try_number, loaded.inserted, loaded.updated, loaded.checksum) == (
        1, 7, 3, "10:copy-binary:42"
    )
    assert loaded.as_dict()["inserted"] == 7 and loaded.as_dict()["checksum"].endswith(":42")
    # A record of an earlier version (no such keys) restores them as None.
    old = DictStore()
    old.set("copyman", {"lineage": "l", "max_tries": 3,
                        "destinations": {"pg_a:public.t": {"rows": 10, "bytes": 100,
                                                           "try_number": 1}}})
    kept = TaskStateLedger(old, 3, resume_on_clear=False).loaded(dest)
    assert kept is not None and kept.rows == 10
    assert (kept.inserted, kept.updated, kept.checksum) == (None, None, None)


def test_operator_rejects_bad_arguments_at_parse_time() -> None:
    from airflow_copyman.operators.copyman import CopyManOperator

    good = [{"conn_id": "pg", "table": "t"}]
    with pytest.raises(ValueError, match="destinations is empty"):
        CopyManOperator(task_id="a", source_conn_id="s", sql="t", destinations=[])
    with pytest.raises(ValueError, match="not a COPY statement"):
        CopyManOperator(task_id="b", source_conn_id="s", sql="COPY t TO STDOUT", destinations=good)
    with pytest.raises(ValueError, match="format must be one of"):
        CopyManOperator(task_id="c", source_conn_id="s", sql="t", destinations=good, format="x")
    with pytest.raises(ValueError, match="unknown key"):
        CopyManOperator(
            task_id="d", source_conn_id="s", sql="t", destinations=[{**good[0], "trunc": True}]
        )
    with pytest.raises(ValueError, match="'table' must be"):
        CopyManOperator(task_id="e", source_conn_id="s", sql="t", destinations=[{"conn_id": "x"}])
    with pytest.raises(ValueError, match="'columns' must be a list of names"):
        CopyManOperator(
            task_id="g", source_conn_id="s", sql="t", destinations=[{**good[0], "columns": [""]}]
        )
    op = CopyManOperator(task_id="f", source_conn_id="s", sql="q.sql", destinations=good)
    assert op.template_fields == (
        "source_conn_id", "sql", "destinations", "parameters", "max_bytes_per_second",
        "min_rows",
    )
    assert op.template_ext == (".sql",)


def test_provider_is_registered() -> None:
    from airflow.providers_manager import ProvidersManager

    info = ProvidersManager().providers["airflow-copyman"]
    assert info.data["hooks"][0]["python-modules"] == ["airflow_copyman.hooks.copyman"]
    from airflow_copyman.hooks.copyman import CopyManHook

    assert (CopyManHook.conn_type, CopyManHook.conn_name_attr) == ("postgres", "postgres_conn_id")
    assert CopyManHook.hook_name and CopyManHook.default_conn_name == "postgres_default"


def test_airflow_providers_list_shows_the_package() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "providers", "list", "-o", "json"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    packages = {p["package_name"]: p for p in json.loads(out[out.index("[") :])}
    assert "airflow-copyman" in packages
    assert "CopyManHook" in packages["airflow-copyman"]["description"]


def test_openlineage_facets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Input: the source; outputs: each destination with its row count (where the
    OpenLineage provider is installed). Built from what the task resolved: no connection
    is looked up (none is defined here), and START carries the SQL only."""
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_copyman.hooks.copyman import DestinationResult, TransferReport
    from airflow_copyman.operators.copyman import CopyManOperator

    op = CopyManOperator(
        task_id="ol",
        source_conn_id="ol_src",
        sql="SELECT * FROM sales.orders o JOIN customers c USING (customer_id)",
        destinations=[
            {"conn_id": "ol_wh", "table": "analytics.orders"},
            {"conn_id": "ol_wh", "table": "orders"},
        ],
    )
    start = op.get_openlineage_facets_on_start()
    assert (start.inputs, start.outputs) == ([], [])
    assert start.job_facets["sql"].query.startswith("SELECT * FROM sales.orders")
    endpoints = {
        "ol_src": ("postgres://src.example:5432", "shop"),
        "ol_wh": ("postgres://wh.example:6543", "dwh"),
    }
    op._report = TransferReport(
        7, 70, "binary", 0.1,
        [DestinationResult("ol_wh", "analytics.orders", "loaded", 7, 70),
         DestinationResult("ol_wh", "orders", "failed", error="x")],
        endpoints,
    )
    done = op.get_openlineage_facets_on_complete(None)
    assert sorted(d.name for d in done.inputs) == ["shop.public.customers", "shop.sales.orders"]
    assert {d.namespace for d in done.inputs} == {"postgres://src.example:5432"}
    outputs = {d.name: d for d in done.outputs}
    assert set(outputs) == {"dwh.analytics.orders", "dwh.public.orders"}
    assert {d.namespace for d in done.outputs} == {"postgres://wh.example:6543"}
    stats = outputs["dwh.analytics.orders"].outputFacets["outputStatistics"]
    assert (stats.rowCount, stats.size) == (7, 70)
    assert "outputStatistics" not in outputs["dwh.public.orders"].outputFacets
    table_source = CopyManOperator(
        task_id="ol2", source_conn_id="ol_src", sql="sales.orders",
        destinations=[{"conn_id": "ol_wh", "table": "orders"}],
    )
    table_source._report = TransferReport(0, 0, None, 0.0, [], endpoints)
    assert [d.name for d in table_source.get_openlineage_facets_on_complete(None).inputs] == [
        "shop.sales.orders"
    ]
