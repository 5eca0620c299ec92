"""Each load mode's SQL, from its pure functions, rendered without a server.

psycopg 3.2+ renders a Composable without a connection (``as_string(None)``): identifiers
are quoted exactly as they will be sent.
"""

from __future__ import annotations

from psycopg import sql

from airflow_copyman.load.catalog.names import TableName
from airflow_copyman.load.catalog.tables import Column, copy_in
from airflow_copyman.load.modes import create, statements
from airflow_copyman.load.verify import checksum

STAGE = '"pg_temp"."copyman_merge_stage"'


def text(statement: sql.Composable | None) -> str:
    assert statement is not None
    return statement.as_string(None)


def test_names_are_quoted_exactly() -> None:
    table = TableName.parse('"Sales"."Order Lines"')
    assert table is not None
    assert text(table.identifier) == '"Sales"."Order Lines"'
    assert text(statements.names(["id", "Mixed", 'a"b'])) == '"id", "Mixed", "a""b"'
    folded = TableName.parse("Public.Orders")
    assert folded is not None and text(folded.identifier) == '"public"."orders"'


def test_truncate_and_delete() -> None:
    t = sql.Identifier("s", "T")
    assert text(statements.truncate(t, only=False, cascade=False)) == 'TRUNCATE TABLE "s"."T"'
    assert (
        text(statements.truncate(t, only=True, cascade=True))
        == 'TRUNCATE TABLE ONLY "s"."T" CASCADE'
    )
    assert text(statements.delete_all(t, only=False)) == 'DELETE FROM "s"."T"'
    assert text(statements.delete_all(t, only=True)) == 'DELETE FROM ONLY "s"."T"'


def test_copy_statements() -> None:
    table = TableName("app", "Events")
    assert text(copy_in(table, None, "binary")) == 'COPY "app"."Events" FROM STDIN (FORMAT binary)'
    assert (
        text(copy_in(table, ["id", "Note"], "text", freeze=True))
        == 'COPY "app"."Events" ("id", "Note") FROM STDIN (FORMAT text, FREEZE)'
    )
    assert (
        text(statements.copy_into_stage(["id", "Note"], "csv"))
        == f'COPY {STAGE} ("id", "Note") FROM STDIN (FORMAT csv)'
    )


def test_merge_stage_and_key_checks_with_a_composite_key() -> None:
    t = sql.Identifier("app", "Events")
    assert text(statements.create_stage(t, ["Id", "day", "v"])) == (
        f'CREATE TEMPORARY TABLE {STAGE} ON COMMIT DROP AS SELECT "Id", "day", "v" '
        'FROM "app"."Events" WITH NO DATA'
    )
    assert text(statements.null_key_count(["Id", "day"])) == (
        'SELECT count(*), count(*) FILTER (WHERE "Id" IS NULL), '
        f'count(*) FILTER (WHERE "day" IS NULL) FROM {STAGE} WHERE "Id" IS NULL OR "day" IS NULL'
    )
    assert (
        text(statements.unique_key_index(["Id", "day"], nulls_match=False))
        == f'CREATE UNIQUE INDEX ON {STAGE} ("Id", "day")'
    )
    assert (
        text(statements.unique_key_index(["Id"], nulls_match=True))
        == f'CREATE UNIQUE INDEX ON {STAGE} ("Id") NULLS NOT DISTINCT'
    )


def test_merge_update_changes_only_rows_whose_values_differ() -> None:
    send = {"v": sql.Identifier("pg_catalog", "numeric_send"), "Note": None}
    update = statements.update_changed(
        sql.Identifier("Events"), ["Id", "day", "v", "Note"], ["Id", "day"], send,
        nulls_match=False,
    )
    assert text(update) == (
        'UPDATE "Events" AS "t" SET "v" = "s"."v", "Note" = "s"."Note" '
        f'FROM {STAGE} AS "s" WHERE "t"."Id" = "s"."Id" AND "t"."day" = "s"."day" '
        'AND ("pg_catalog"."numeric_send"("t"."v"), "t"."Note"::text) IS DISTINCT FROM '
        '("pg_catalog"."numeric_send"("s"."v"), "s"."Note"::text)'
    )
    # Only key columns: a found row has nothing to change, so there is no UPDATE.
    assert statements.update_changed(
        sql.Identifier("Events"), ["Id"], ["Id"], {}, nulls_match=False
    ) is None


def test_merge_insert_and_key_nulls_match() -> None:
    insert = statements.insert_missing(
        sql.Identifier("Events"), ["Id", "v"], ["Id"], nulls_match=True
    )
    assert text(insert) == (
        f'INSERT INTO "Events" ("Id", "v") SELECT "s"."Id", "s"."v" FROM {STAGE} AS "s" '
        'WHERE NOT EXISTS (SELECT FROM "Events" AS "t" WHERE "t"."Id" IS NOT DISTINCT FROM '
        '"s"."Id")'
    )


def test_checksum_read_back_relations_and_conditions() -> None:
    assert text(statements.merged_rows(["Id", "day"], nulls_match=False)) == (
        f'EXISTS (SELECT FROM {STAGE} AS "s" WHERE "r"."Id" = "s"."Id" AND "r"."day" = "s"."day")'
    )
    assert text(checksum.inserted_by("1234")) == "xmin = '1234'::xid"
    assert text(checksum.inserted_by(None)) == "false"
    only = checksum.Only(sql.Identifier("Parent"))
    assert text(only) == 'ONLY "Parent"'
    assert checksum.table_of(only) == sql.Identifier("Parent")


def test_create_with_typmods_collations_and_keys() -> None:
    columns = [
        Column("Id", 23, "integer", "b", "integer"),
        Column("amount", 1700, "numeric", "b", "numeric(12,2)"),
        Column("Name", 1043, "character varying", "b", "character varying(40)",
               collation=("pg_catalog", "C")),
        Column("tags", 1009, "text[]", "b", "text[]"),
    ]
    table = TableName("app", "New Table")
    assert text(create.statement(table, columns, ["Id"])) == (
        'CREATE TABLE "app"."New Table" ("Id" integer, "amount" numeric(12,2), '
        '"Name" character varying(40) COLLATE "pg_catalog"."C", "tags" text[], '
        'PRIMARY KEY ("Id"))'
    )
    assert text(create.statement(table, columns[:2], ["Id", "amount"], nulls_match=True)) == (
        'CREATE TABLE "app"."New Table" ("Id" integer, "amount" numeric(12,2), '
        'UNIQUE NULLS NOT DISTINCT ("Id", "amount"))'
    )
    assert text(create.statement(table, columns[:1], None)) == (
        'CREATE TABLE "app"."New Table" ("Id" integer)'
    )


def test_destinations_have_typed_modes() -> None:
    from airflow_copyman import load

    def mode_of(**given: object) -> load.LoadMode:
        return load.Destination.from_value({"conn_id": "c", "table": "t", **given}, 0).load_mode

    assert mode_of() == load.Append()
    assert mode_of(truncate=True) == load.Replace("truncate", cascade=False)
    assert mode_of(mode="replace", replace_with="delete", cascade=True) == load.Replace(
        "delete", cascade=True
    )
    assert mode_of(mode="merge", key="Id") == load.Merge(("Id",))
    assert mode_of(mode="merge", key=["a", "b"], key_nulls="match") == load.Merge(
        ("a", "b"), "match"
    )
