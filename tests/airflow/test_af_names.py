"""Names against real servers: columns are plain names, taken exactly as given; tables are SQL;
a name that differs from an existing one only in case or quoting gets a hint."""

from __future__ import annotations

import warnings

import pytest
from af_support import Database, Events, PgServers, run_dag

from airflow_copyman.hooks.copyman import CopyManConfigError, CopyManHook, Destination
from airflow_copyman.load.catalog.hints import CopyManDeprecationWarning

MIXED_DDL = 'CREATE TABLE "Orders" ("Id" int PRIMARY KEY, "Day" date, amount numeric, "ID" int)'
MIXED_ROWS = """INSERT INTO "Orders"
SELECT g, date '2024-01-01' + g % 3, g * 1.5, -g FROM generate_series(1, 50) g"""


@pytest.fixture
def mixed(pg: PgServers, monkeypatch: pytest.MonkeyPatch) -> tuple[Database, Database]:
    """A source and a destination with a mixed-case table and mixed-case columns."""
    src, dst = pg.database(pg.src, "msrc"), pg.database(pg.dst1, "mdst")
    for db in (src, dst):
        db.execute(MIXED_DDL)
    src.execute(MIXED_ROWS)
    monkeypatch.setenv("AIRFLOW_CONN_PG_MSRC", src.uri())
    monkeypatch.setenv("AIRFLOW_CONN_PG_MDST", dst.uri())
    return src, dst


def test_mixed_case_columns_are_given_plainly(mixed: tuple[Database, Database]) -> None:
    src, dst = mixed
    with warnings.catch_warnings():
        warnings.simplefilter("error", CopyManDeprecationWarning)  # the plain form warns not
        report = CopyManHook("pg_msrc").transfer(
            'SELECT "Id", "Day", amount FROM "Orders" WHERE "Id" <= 30',
            # "ID" and "Id" are two columns: a name is the column spelled exactly so.
            [Destination("pg_mdst", 'public."Orders"', columns=("Id", "Day", "amount"))],
        )
    assert [(d.status, d.rows) for d in report.destinations] == [("loaded", 30)], report
    assert dst.execute('SELECT "Id", "Day", amount, "ID" FROM "Orders" ORDER BY 1') == [
        (i, d, a, None)
        for i, d, a, _ in src.execute('SELECT * FROM "Orders" WHERE "Id" <= 30 ORDER BY 1')
    ]
    # "ID" given exactly is "ID", not the column "Id" nor a folded "id".
    dst.execute('TRUNCATE "Orders"')
    report = CopyManHook("pg_msrc").transfer(
        'SELECT "Id", "ID" FROM "Orders" WHERE "Id" <= 5',
        [Destination("pg_mdst", '"Orders"', columns=("Id", "ID"))],
    )
    assert report.destinations[0].status == "loaded", report
    assert dst.execute('SELECT "Id", "ID" FROM "Orders" ORDER BY 1') == [
        (i, -i) for i in range(1, 6)
    ]
    # Where "Id" and id both exist, "Id" is "Id" (the SQL reading would be id).
    dst.execute('CREATE TABLE both_ids ("Id" int, id int)')
    report = CopyManHook("pg_msrc").transfer(
        "SELECT 7", [Destination("pg_mdst", "both_ids", columns=("Id",))]
    )
    assert report.destinations[0].status == "loaded", report
    assert dst.execute('SELECT "Id", id FROM both_ids') == [(7, None)]


def test_sql_spelled_columns_still_work_with_a_deprecation_warning(
    mixed: tuple[Database, Database],
) -> None:
    _, dst = mixed
    with pytest.warns(CopyManDeprecationWarning) as record:
        report = CopyManHook("pg_msrc").transfer(
            'SELECT "Id", amount FROM "Orders"',
            [{"conn_id": "pg_mdst", "table": '"Orders"', "columns": ['"Id"', "AMOUNT"]}],
        )
    assert [str(w.message).split(": ", 1)[1].split(";")[0] for w in record] == [
        """column '"Id"' is read as the SQL identifier "Id" (column 'Id')""",
        "column 'AMOUNT' is read as the SQL identifier AMOUNT (column 'amount')",
    ]
    assert all("write the plain name" in str(w.message) for w in record)
    assert report.destinations[0].status == "loaded", report
    assert dst.scalar('SELECT count(*) FROM "Orders" WHERE amount IS NOT NULL') == 50


@pytest.mark.parametrize(
    ("source", "table", "columns", "message"),
    [
        # A column whose name differs only in case: the exact name to write.
        ('"Orders"', '"Orders"', ["id", "day", "amount", "iD"],
         "has no column 'id' (did you mean 'Id' or 'ID'?), 'day' (did you mean 'Day'?), "
         "'iD' (did you mean 'Id' or 'ID'?); column names are taken exactly as given"),
        # An unquoted table name folds to lower case: the SQL spelling to use.
        ('"Orders"', "Orders", None,
         """table "orders" does not exist; did you mean '"Orders"'?"""),
        ('"Orders"', "public.Orders", None,
         """table "public"."orders" does not exist; did you mean 'public."Orders"'?"""),
        ("Orders", '"Orders"', None,
         """source table "orders" does not exist; did you mean '"Orders"'?"""),
        # A table a query names.
        ("SELECT * FROM orders o", '"Orders"', None,
         """UndefinedTable [42P01]: relation "orders" does not exist; did you mean '"Orders"'?"""),
        ('SELECT * FROM "Orders" JOIN public.ORDERS USING ("Id")', '"Orders"', None,
         """relation "public.orders" does not exist; did you mean 'public."Orders"'?"""),
    ],
)
def test_names_that_differ_only_in_case_get_a_hint(
    mixed: tuple[Database, Database],
    source: str,
    table: str,
    columns: list[str] | None,
    message: str,
) -> None:
    _, dst = mixed
    with pytest.raises(CopyManConfigError) as info:
        CopyManHook("pg_msrc").transfer(
            source, [{"conn_id": "pg_mdst", "table": table, "columns": columns}]
        )
    assert message in str(info.value)
    assert dst.scalar('SELECT count(*) FROM "Orders"') == 0


def test_a_missing_table_with_no_near_name_gets_no_hint(mixed: tuple[Database, Database]) -> None:
    with pytest.raises(CopyManConfigError) as info:
        CopyManHook("pg_msrc").transfer('"Orders"', [Destination("pg_mdst", "invoices")])
    assert str(info.value).endswith('table "invoices" does not exist')


@pytest.mark.usefixtures("airflow_db")
def test_a_templated_key_and_min_rows_render_as_text_and_are_taken(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, events: Events
) -> None:
    """Without native rendering a list renders as its text (``"['id', 'day']"``): it is
    taken as that list; ``min_rows`` is templated, checked once rendered, and its error
    quotes the rendered value (before: the raw template). Rendered text that is no list of
    names is refused with how to render one."""
    src, dst = pg.database(pg.src, "nsrc"), pg.database(pg.dst1, "ndst")
    dst.execute(
        "CREATE TABLE items (id int, day date, v text); CREATE TABLE untouched (id int, "
        "day date, v text); INSERT INTO items VALUES (1, '2024-01-02', 'old'), "
        "(2, '2024-01-01', 'other day')"
    )
    monkeypatch.setenv("AIRFLOW_CONN_PG_NSRC", src.uri())
    monkeypatch.setenv("AIRFLOW_CONN_PG_NDST", dst.uri())
    run = run_dag("copyman_names_dags.py", "copyman_test_names")
    assert run.tis["templated_key"] == ("success", 1)
    (merged,) = run.xcom("templated_key")["destinations"]
    assert (merged["inserted"], merged["updated"]) == (4, 1)  # keyed on (id, day)
    assert dst.scalar("SELECT count(*) FROM items") == 6
    failures = {e["task_id"]: e for e in events if e["event"] == "failure"}
    assert set(failures) == {"too_few_rows", "bad_min_rows", "bad_key"}
    assert "fewer than min_rows=6" in failures["too_few_rows"]["message"]
    for task_id, fragment in [
        ("bad_min_rows", "min_rows must be a whole number, got the string 'lots'"),
        ("bad_key", "'key' is the text '[1, 2]', not a list of column names"),
    ]:
        assert run.tis[task_id] == ("failed", 1)
        assert "AirflowFailException" in failures[task_id]["bases"], failures[task_id]
        assert fragment in failures[task_id]["message"]
        assert "{{" not in failures[task_id]["message"]
    assert "render_template_as_native_obj=True" in failures["bad_key"]["message"]
    assert dst.scalar("SELECT count(*) FROM untouched") == 0


def test_min_rows_is_checked_at_parse_time_unless_templated() -> None:
    from airflow_copyman.operators.copyman import CopyManOperator

    def operator(min_rows: object) -> CopyManOperator:
        return CopyManOperator(
            task_id="t", source_conn_id="s", sql="t",
            destinations=[{"conn_id": "d", "table": "t"}], min_rows=min_rows,  # type: ignore[arg-type]
        )

    assert operator("{{ params.n }}").min_rows == "{{ params.n }}"
    assert "min_rows" in CopyManOperator.template_fields
    with pytest.raises(ValueError, match="t: min_rows must be a whole number, got the string 'x'"):
        operator("x")
