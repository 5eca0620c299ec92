"""Split loads (issue 18): range planning as pure functions, and from a real catalog."""

from __future__ import annotations

import random
from typing import Any

import psycopg
import pytest

from airflow_copyman import split
from airflow_copyman.split import _ranges as r


def exactly_once(ranges: list[r.Range], values: list[Any], parse: Any = int) -> None:
    for value in values:
        holders = [x.index for x in ranges if r.contains(x, value, parse)]
        assert len(holders) == 1, (value, holders, ranges)


@pytest.mark.parametrize("seed", range(30))
def test_integer_ranges_hold_every_value_once_with_negatives_gaps_and_skew(seed: int) -> None:
    rnd = random.Random(seed)
    low = rnd.randint(-10**12, 10**6)
    high = low + rnd.choice([0, 1, 5, 10**3, 10**15])
    parts = rnd.randint(1, 1024)
    ranges = r.ranges_from_cuts(
        "id", [str(c) for c in r.integer_cuts(low, high, parts)], nulls=True
    )
    assert len(ranges) <= parts + 1
    assert [x.index for x in ranges] == list(range(len(ranges)))
    # Values inside, at the edges and far outside the bounds the plan saw (stale stats).
    values = [low, high, low - 1, high + 1, -(2**63), 2**63 - 1, None]
    values += [rnd.randint(low, high) for _ in range(200)]
    exactly_once(ranges, values)
    assert ranges[0].lower is None and ranges[-2].upper is None and ranges[-1].kind == "nulls"


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 64, 100, 1024])
def test_histogram_cuts_are_increasing_inner_bounds(parts: int) -> None:
    bounds = [str(v) for v in sorted(random.Random(parts).sample(range(-5000, 5000), 101))]
    cuts = r.cuts_from_histogram(bounds, parts)
    assert len(cuts) <= parts - 1 if parts > 1 else cuts == []
    assert [int(c) for c in cuts] == sorted({int(c) for c in cuts})
    assert bounds[0] not in cuts and bounds[-1] not in cuts
    ranges = r.ranges_from_cuts("k", cuts, nulls=False)
    exactly_once(ranges, list(range(-6000, 6000, 7)))


def test_skewed_histogram_repeats_collapse() -> None:
    cuts = r.cuts_from_histogram(["1", "5", "5", "5", "5", "9"], 5)
    assert cuts == ["5"]


def test_numeric_date_and_timestamp_cuts() -> None:
    assert r.cuts_from_bounds("numeric", "-1.5", "1.5", 3) == ["-0.5", "0.5"]
    assert r.cuts_from_bounds("date", "2024-01-01", "2024-01-04", 2) == ["2024-01-03"]
    assert r.cuts_from_bounds("timestamp", "0", "86400", 2) == ["1970-01-01 12:00:00"]
    assert r.cuts_from_bounds("timestamptz", "0", "86400", 2) == [
        "1970-01-01 12:00:00+00:00"
    ]
    assert r.cuts_from_bounds("integer", "7", "7", 16) == []  # one value: one range


def test_ctid_ranges_start_at_block_zero_and_the_last_is_open() -> None:
    ranges = r.ctid_ranges(10, 3)
    assert [(x.lower, x.upper) for x in ranges] == [
        (None, "(3,0)"), ("(3,0)", "(6,0)"), ("(6,0)", None)
    ]
    assert r.ctid_ranges(1, 8) == [r.Range(0, "ctid", None)]
    assert split.range_query("s", "t", r.Range(0, "ctid", None, "(3,0)", None), None) == (
        'SELECT * FROM "s"."t" WHERE ctid >= \'(3,0)\'::tid'
    )


def test_range_query_keeps_where_apart_and_percent_signs() -> None:
    text = split.range_query("public", "t", r.Range(1, "key", "id", "5", "9"), "v LIKE 'a%'")
    assert text == (
        'SELECT * FROM "public"."t" WHERE ("id" >= \'5\' AND "id" < \'9\') AND (v LIKE \'a%\')'
    )
    assert "IS NULL" in split.range_query("p", "t", r.Range(2, "nulls", "id"), None)


# From the catalog of a real server.


def rows_per_range(conn: psycopg.Connection[Any], table: str, ranges: list[r.Range]) -> list[int]:
    source = split.plan_source(conn, table)
    counts = [
        len(conn.execute(split.range_query(source.schema, source.name, x, None)).fetchall())  # type: ignore[arg-type]
        for x in ranges
    ]
    conn.rollback()
    return counts


def test_catalog_plans_bigint_key_with_gaps_negatives_and_nulls(dbs: Any) -> None:
    conn = dbs.new("split")
    conn.execute(
        "CREATE TABLE t (id bigint, v text);"
        " INSERT INTO t SELECT g * 1000, 'x' FROM generate_series(-500, 500) g;"
        " INSERT INTO t SELECT NULL, 'n' FROM generate_series(1, 3);"
        " INSERT INTO t VALUES (9223372036854775807, 'max'), (-9223372036854775808, 'min')"
    )
    conn.commit()
    for analyzed in (False, True):
        if analyzed:
            conn.execute("ANALYZE t")
            conn.commit()
        source, ranges = split.plan(conn, "t", "id", 8)
        assert str(source) == "public.t"
        counts = rows_per_range(conn, "t", ranges)
        assert sum(counts) == 1006 and counts[-1] == 3 and ranges[-1].kind == "nulls"
        assert 8 <= len(ranges) <= 9


def test_catalog_defaults_to_the_integer_primary_key_else_ctid(dbs: Any) -> None:
    conn = dbs.new("split")
    conn.execute(
        "CREATE TABLE k (id int PRIMARY KEY, v text); INSERT INTO k SELECT g, 'v' FROM"
        " generate_series(1, 100) g;"
        " CREATE TABLE h (v text); INSERT INTO h SELECT repeat('x', 200) FROM"
        " generate_series(1, 2000); DELETE FROM h WHERE random() < 0.3;"
        " CREATE TABLE d (day date, at timestamptz, n numeric(10,2));"
        " INSERT INTO d SELECT date '2024-01-01' + g, timestamptz '2024-01-01' + g * interval '1h',"
        " g / 3.0 FROM generate_series(0, 99) g"
    )
    conn.commit()
    _, ranges = split.plan(conn, "k", None, 4)
    assert {x.column for x in ranges} == {"id"} and len(ranges) == 4  # NOT NULL: no NULL range
    _, ranges = split.plan(conn, "h", None, 4)
    assert {x.kind for x in ranges} == {"ctid"} and len(ranges) == 4
    assert sum(rows_per_range(conn, "h", ranges)) == conn.execute(
        "SELECT count(*) FROM h").fetchone()[0]  # type: ignore[index]
    conn.rollback()
    for column in ("day", "at", "n"):
        _, ranges = split.plan(conn, "d", column, 4)
        assert sum(rows_per_range(conn, "d", ranges)) == 100, column


def test_catalog_plans_a_partitioned_table_over_all_its_partitions(dbs: Any) -> None:
    conn = dbs.new("split")
    conn.execute(
        "CREATE TABLE p (id bigint, day date) PARTITION BY RANGE (day);"
        " CREATE TABLE p1 PARTITION OF p FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');"
        " CREATE TABLE p2 PARTITION OF p FOR VALUES FROM ('2024-02-01') TO ('2024-03-01');"
        " INSERT INTO p SELECT g, date '2024-01-01' + (g % 59) FROM generate_series(1, 500) g"
    )
    conn.commit()
    for column in ("id", "day"):
        _, ranges = split.plan(conn, "p", column, 5)
        assert sum(rows_per_range(conn, "p", ranges)) == 500, column


def test_catalog_refuses_what_cannot_split(dbs: Any) -> None:
    conn = dbs.new("split")
    conn.execute(
        "CREATE TABLE t (v text, id int); CREATE TABLE p (v text) PARTITION BY LIST (v);"
        " CREATE TABLE p1 PARTITION OF p FOR VALUES IN ('a'); CREATE VIEW w AS SELECT 1"
    )
    conn.commit()
    with pytest.raises(split.SplitPlanError, match=r"split_by: column .v. of public\.t is text"):
        split.plan(conn, "t", "v", 4)
    with pytest.raises(split.SplitPlanError, match=r"split_by: public\.t has no column 'nope'"):
        split.plan(conn, "t", "nope", 4)
    with pytest.raises(split.SplitPlanError, match=r"split_by: public\.p has children"):
        split.plan(conn, "p", None, 4)
    with pytest.raises(split.SplitPlanError, match="table: 'w' is not a table"):
        split.plan(conn, "w", None, 4)
    with pytest.raises(split.SplitPlanError, match="does not exist"):
        split.plan(conn, "missing", None, 4)
