"""Names decide (issue 15): columns pair by name, by position only when no name matches;
generated columns, unnamed and repeated source columns, collations on create, a key given
as a string, key names that miss, key types without equality. Real loads through
``load.run`` (no Airflow), on a real server."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from af_support import Database
from exact_support import has_xml

from airflow_copyman import load
from airflow_copyman.load import ConfigError, Destination, TransferReport


def run(
    pair: tuple[Database, Database], sql: str, *destinations: Destination | dict[str, Any],
    **options: Any,
) -> TransferReport:
    src, dst = pair
    return load.run(
        load.postgres("src", src.address.conninfo(src.name)), sql, list(destinations),
        endpoints={"wh": load.postgres("wh", dst.address.conninfo(dst.name))}, **options,
    )


def refused(pair: tuple[Database, Database], sql: str, *destinations: Any) -> str:
    with pytest.raises(ConfigError) as info:
        run(pair, sql, *destinations)
    return str(info.value)


def loaded(report: TransferReport) -> list[tuple[str, int | None]]:
    return [(d.status, d.rows) for d in report.destinations]


# Columns pair by name.


def test_a_renamed_column_among_matching_ones_is_refused_before_anything_moves(
    pair: tuple[Database, Database],
) -> None:
    """As seen: ``b2`` differs, the counts are equal, so every column paired by position and
    ``pos`` held b=1, a=2, checksum passing. Now refused, naming the column and the table's."""
    _, dst = pair
    dst.execute("CREATE TABLE pos (b int, a int)")
    with pytest.raises(ConfigError) as info:
        run(pair, "SELECT 1 AS a, 2 AS b2", Destination("wh", "pos"), verify="checksum")
    message = str(info.value)
    assert "destination #1 (wh, table pos): column name mismatch" in message
    assert "the source's column 'b2' has no destination column of that name" in message
    assert "(the destination has b, a)" in message
    assert dst.execute("SELECT count(*) FROM pos") == [(0,)]
    # Matching names pair by name, in whatever order the table has them.
    report = run(pair, "SELECT 1 AS a, 2 AS b", Destination("wh", "pos"), verify="checksum")
    assert loaded(report) == [("loaded", 1)]
    assert dst.execute("SELECT b, a FROM pos") == [(2, 1)]


def test_position_only_when_no_name_matches_and_the_log_says_so(
    pair: tuple[Database, Database], caplog: pytest.LogCaptureFixture,
) -> None:
    _, dst = pair
    dst.execute("CREATE TABLE pos (b int, a int)")
    log = logging.getLogger("test_load_names")
    with caplog.at_level(logging.WARNING, logger="test_load_names"):
        report = run(pair, "SELECT 1 AS x, 2 AS y", Destination("wh", "pos"), log=log)
    assert loaded(report) == [("loaded", 1)]
    assert dst.execute("SELECT b, a FROM pos") == [(1, 2)]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "destination #1 (wh, table pos): no column of the source is named like" in warning
    assert "pairing them by position: x -> b, y -> a" in warning


def test_position_never_crosses_a_name_that_differs_only_in_case(
    pair: tuple[Database, Database],
) -> None:
    """``"NAME", "ID"`` into ``(id, name)``: no name matches exactly, but position would
    pair each with the other's namesake."""
    _, dst = pair
    dst.execute("CREATE TABLE upper_ (id int, name text)")
    message = refused(pair, 'SELECT \'n\' AS "NAME", 1 AS "ID"', Destination("wh", "upper_"))
    assert "the source's columns 'NAME' (did you mean 'name'?), 'ID' (did you mean 'id'?) " \
        "have no destination column of that name" in message
    # In the table's order they pair by position, as before.
    report = run(pair, 'SELECT 1 AS "ID", \'n\' AS "NAME"', Destination("wh", "upper_"))
    assert loaded(report) == [("loaded", 1)]
    assert dst.execute("SELECT id, name FROM upper_") == [(1, "n")]


def test_a_mismatch_names_every_unmatched_column_with_hints(
    pair: tuple[Database, Database],
) -> None:
    _, dst = pair
    dst.execute('CREATE TABLE hint (id int, "Name" text, note text)')
    message = refused(
        pair, 'SELECT 1 AS id, \'n\' AS name, 2 AS "extra"', Destination("wh", "hint")
    )
    assert "column name mismatch: the source's columns 'name' (did you mean 'Name'?), " \
        "'extra' have no destination column of that name (the destination has id, Name, note)" \
        in message
    # Counts differ: said too.
    message = refused(pair, "SELECT 1 AS id, 2 AS other", Destination("wh", "hint"))
    assert "column count mismatch: the source has 2 columns (id, other), the destination 3" \
        in message
    assert "the source's column 'other' has no destination column of that name" in message


def test_a_source_naming_a_column_twice_is_refused_naming_it(
    pair: tuple[Database, Database],
) -> None:
    _, dst = pair
    dst.execute("CREATE TABLE two (a int, b int)")
    message = refused(pair, "SELECT 1 AS a, 2 AS a", Destination("wh", "two"))
    assert "the source names a column twice: 'a'" in message


def test_destination_columns_the_source_lacks_take_their_defaults(
    pair: tuple[Database, Database],
) -> None:
    _, dst = pair
    dst.execute("CREATE TABLE wide (id int, note text DEFAULT 'n', other int)")
    report = run(pair, "SELECT 7 AS id", Destination("wh", "wide"))
    assert loaded(report) == [("loaded", 1)]
    assert dst.execute("SELECT * FROM wide") == [(7, "n", None)]


def test_generated_destination_columns(pair: tuple[Database, Database]) -> None:
    """A generated column the source lacks is computed; one the source gives is refused,
    by name or in 'columns' (before: reported as missing, or paired by position)."""
    _, dst = pair
    dst.execute(
        "CREATE TABLE gen (id int, twice int GENERATED ALWAYS AS (id * 2) STORED, note text)"
    )
    report = run(pair, "SELECT 3 AS id, 'x' AS note", Destination("wh", "gen"))
    assert loaded(report) == [("loaded", 1)]
    assert dst.execute("SELECT * FROM gen") == [(3, 6, "x")]
    for sql in ("SELECT 1 AS id, 2 AS twice, 'x' AS note", "SELECT 1 AS id, 2 AS twice"):
        message = refused(pair, sql, Destination("wh", "gen"))
        assert "column 'twice' of table \"gen\" is generated: leave it out of the query" in message
    message = refused(pair, "SELECT 1, 2", Destination("wh", "gen", columns=("id", "twice")))
    assert "column 'twice' of table \"gen\" is generated: leave it out of 'columns'" in message
    assert dst.execute("SELECT count(*) FROM gen") == [(1,)]


# create="if_missing": names and collations.


def test_create_refuses_unnamed_and_repeated_columns(pair: tuple[Database, Database]) -> None:
    _, dst = pair
    message = refused(pair, "SELECT 1, 2", Destination("wh", "made", create="if_missing"))
    assert "create='if_missing': the source's columns #1, #2 have no name" in message
    assert "give each an alias (SELECT ... AS name) or give 'columns'" in message
    message = refused(
        pair, "SELECT 1 AS a, 2 AS b, 3 AS a, 4 AS b",
        Destination("wh", "made", create="if_missing"),
    )
    assert "create='if_missing': the source names a column twice: 'a', 'b'" in message
    assert dst.execute("SELECT to_regclass('made') IS NULL") == [(True,)]
    report = run(
        pair, "SELECT 1, 2", Destination("wh", "made", create="if_missing", columns=("x", "y"))
    )
    assert loaded(report) == [("loaded", 1)]
    assert dst.execute("SELECT x, y FROM made") == [(1, 2)]


COLLATIONS = """
SELECT a.attname::text, c.collname::text FROM pg_attribute a
JOIN pg_collation c ON c.oid = a.attcollation
WHERE a.attrelid = %s::regclass AND a.attnum > 0 ORDER BY a.attnum
"""


def test_create_keeps_a_source_columns_collation(pair: tuple[Database, Database]) -> None:
    """A table source, and a query's plain column references (the row description names
    their table column); an expression's collation is not known."""
    src, dst = pair
    src.execute(
        'CREATE TABLE words (w text COLLATE "C", p text COLLATE "POSIX", d text); '
        "INSERT INTO words VALUES ('b', 'b', 'b'), ('a', 'a', 'a')"
    )
    report = run(pair, "words", Destination("wh", "from_table", create="if_missing"))
    assert loaded(report) == [("loaded", 2)]
    assert dst.execute(COLLATIONS, ["from_table"]) == [
        ("w", "C"), ("p", "POSIX"), ("d", "default")
    ]
    report = run(
        pair, "SELECT x.p, x.w AS renamed, x.d || '' AS expr FROM words x",
        Destination("wh", "from_query", create="if_missing"),
    )
    assert loaded(report) == [("loaded", 2)]
    assert dst.execute(COLLATIONS, ["from_query"]) == [
        ("p", "POSIX"), ("renamed", "C"), ("expr", "default")
    ]


def test_create_refuses_a_collation_the_destination_lacks(
    pair: tuple[Database, Database],
) -> None:
    src, dst = pair
    src.execute(
        'CREATE COLLATION mine FROM "C"; CREATE TABLE words (w text COLLATE mine); '
        "INSERT INTO words VALUES ('a')"
    )
    message = refused(pair, "words", Destination("wh", "made", create="if_missing"))
    assert "column w has the collation public.mine, which this server does not have" in message
    assert dst.execute("SELECT to_regclass('made') IS NULL") == [(True,)]


# The merge key.


def test_a_key_given_as_a_string_is_one_column(pair: tuple[Database, Database]) -> None:
    """As seen: ``key="TenantId"`` was read as its characters."""
    _, dst = pair
    dst.execute('CREATE TABLE tenants ("TenantId" int, v text); '
                "INSERT INTO tenants VALUES (1, 'old')")
    assert Destination("wh", "tenants", mode="merge", key="TenantId").key == ("TenantId",)
    sql = 'SELECT g AS "TenantId", \'v\' || g AS v FROM generate_series(1, 3) g'
    report = run(pair, sql, Destination("wh", "tenants", mode="merge", key="TenantId"))
    assert [(d.status, d.inserted, d.updated) for d in report.destinations] == [
        ("loaded", 2, 1)
    ]
    report = run(pair, sql, {"conn_id": "wh", "table": "tenants", "mode": "merge",
                             "key": "TenantId"})
    # The same rows again: every key found, nothing changed, nothing rewritten.
    assert [(d.status, d.inserted, d.updated) for d in report.destinations] == [
        ("loaded", 0, 0)
    ]


def test_a_string_is_never_split_into_characters() -> None:
    """A string left as it is (a template, or columns given as a string) stays one value
    when a destination is rebuilt (validated, or rendered): before, it became its
    characters."""
    with pytest.raises(ConfigError, match="'columns' must be a list of column names, got str"):
        Destination.from_value(Destination("wh", "t", columns="id"), 0)
    templated = Destination("wh", "t", mode="merge", key="{{ params.key }}")
    assert templated.key == "{{ params.key }}"
    rendered = templated.rendered(lambda v: "['a', 'b']" if v == "{{ params.key }}" else v)
    assert rendered.key == ("a", "b")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("['a', 'b']", ("a", "b")), ('["a"]', ("a",)), ("('a', 'b')", ("a", "b")),
     ("a", ("a",))],
)
def test_a_key_rendered_as_the_text_of_a_list_is_that_list(
    text: str, expected: tuple[str, ...]
) -> None:
    value = {"conn_id": "wh", "table": "t", "mode": "merge", "key": text}
    assert Destination.from_value(value, 0).key == expected
    if text != "a":  # columns: a plain string is still refused (see below)
        value = {"conn_id": "wh", "table": "t", "columns": text}
        assert Destination.from_value(value, 0).columns == expected


@pytest.mark.parametrize("text", ["[1, 2]", "['a', 2]", "[]", "['a'"])
def test_a_key_rendered_as_other_text_is_refused_with_a_hint(text: str) -> None:
    value = {"conn_id": "wh", "table": "t", "mode": "merge", "key": text}
    with pytest.raises(ConfigError) as info:
        Destination.from_value(value, 0)
    assert "render_template_as_native_obj" in str(info.value)


def test_key_names_that_miss_get_a_hint(pair: tuple[Database, Database]) -> None:
    _, dst = pair
    dst.execute("CREATE TABLE keyed (id int, v text)")
    message = refused(
        pair, "SELECT 1 AS id, 'v' AS v", Destination("wh", "keyed", mode="merge", key="Id")
    )
    assert "the merge key column 'Id' (did you mean 'id'?) is not among the columns loaded" \
        in message
    message = refused(
        pair, "SELECT 1 AS id, 'v' AS v",
        Destination("wh", "keyed_new", mode="merge", key="ID", create="if_missing"),
    )
    assert "the merge key column 'ID' (did you mean 'id'?) is not a column of the source" \
        in message


@pytest.mark.parametrize(
    ("type_", "value"),
    [("json", "'{}'::json"), ("xml", "'<a/>'::xml"), ("point", "point(1, 2)"),
     ("json[]", "ARRAY['{}'::json]")],
)
def test_a_merge_key_without_equality_is_refused_before_the_copy(
    pair: tuple[Database, Database], type_: str, value: str
) -> None:
    """As seen: a json key failed after the whole copy with an operator-class message."""
    _, dst = pair
    if type_ == "xml" and not has_xml(dst):
        pytest.skip("this server is built without libxml (the embedded 18): no xml values")
    dst.execute(f"CREATE TABLE doc (k {type_}, v int)")
    sql = f"SELECT {value} AS k, 1 AS v"
    message = refused(pair, sql, Destination("wh", "doc", mode="merge", key="k"))
    assert f"the merge key column 'k' is of type {type_}, which has no equality" in message
    assert "jsonb or text" in message
    message = refused(
        pair, sql, Destination("wh", "doc_new", mode="merge", key="k", create="if_missing")
    )
    assert f"the merge key column 'k' is of type {type_}, which has no equality" in message
    assert dst.execute("SELECT to_regclass('doc_new') IS NULL") == [(True,)]


@pytest.mark.parametrize(
    ("type_", "value"),
    [("varchar(5)", "a"), ("jsonb", "{}"), ("int[]", "{1}"), ("int4range", "[1,2)"),
     ("mood", "ok"), ("pair", "(1,x)"), ("oidvector", "1 2")],
)
def test_merge_keys_of_types_with_equality_load(
    pair: tuple[Database, Database], type_: str, value: str
) -> None:
    """Types that reach a btree operator class through a binary cast, an array, an enum,
    a range or a composite."""
    src, _ = pair
    for db in pair:
        db.execute("CREATE TYPE mood AS ENUM ('ok'); CREATE TYPE pair AS (x int, y text); "
                   f"CREATE TABLE doc (k {type_}, v int)")
    src.execute("INSERT INTO doc VALUES (%s, 1)", [value])
    report = run(pair, "doc", Destination("wh", "doc", mode="merge", key="k"))
    assert [(d.status, d.inserted) for d in report.destinations] == [("loaded", 1)], report
