"""``mode="replace"`` touches only its table (issue 15, "Replace touches only the table"):
rows of tables referencing it, and of its inheritance children, are kept; a table
referenced by foreign keys is refused before anything moves unless ``cascade=True`` says the
user wants what cascades (and the log says what that is). Real loads through ``load.run``."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import psycopg
import pytest

from airflow_copyman import load
from airflow_copyman.testing.servers import ContainerServer, LocalServer, create_database

_names = itertools.count()
Server = LocalServer | ContainerServer


class Pair:
    """A source database holding ``src(id, v)`` (ids 1..5), and a destination database."""

    def __init__(self, server: Server) -> None:
        n = next(_names)
        self.names = (f"scope_src_{n}", f"scope_dst_{n}")
        for name in self.names:
            create_database(server.address, name)
        self.src_info, self.dst_info = (server.address.conninfo(x) for x in self.names)
        with psycopg.connect(self.src_info, autocommit=True) as conn:
            conn.execute("CREATE TABLE src AS SELECT g AS id, 'v' || g AS v "
                         "FROM generate_series(1, 5) g")

    def dst(self, statement: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dst_info, autocommit=True) as conn:
            cur = conn.execute(statement)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def run(self, **destination: Any) -> load.TransferReport:
        return load.run(
            load.postgres("src", self.src_info), "src",
            [load.Destination("wh", **destination)],
            endpoints={"wh": load.postgres("wh", self.dst_info)},
            verify="checksum",
        )


@pytest.fixture
def pair(server: Server) -> Pair:
    return Pair(server)


CASCADING = """
CREATE TABLE parent (id int PRIMARY KEY, v text);
INSERT INTO parent SELECT g, 'old' FROM generate_series(1, 3) g;
CREATE TABLE child (id int, parent_id int REFERENCES parent ON DELETE CASCADE);
INSERT INTO child VALUES (1, 1), (2, 2), (3, 3);
"""


@pytest.mark.parametrize("method", ["truncate", "delete"])
def test_a_table_referenced_by_a_cascading_key_is_refused_naming_it(
    pair: Pair, method: str
) -> None:
    pair.dst(CASCADING)
    with pytest.raises(load.ConfigError) as raised:
        pair.run(table="parent", mode="replace", replace_with=method)
    message = str(raised.value)
    assert "child" in message and "child_parent_id_fkey" in message, message
    assert "ON DELETE CASCADE" in message and "cascade=True" in message, message
    # Nothing moved: the child keeps its rows, the parent its old ones.
    assert pair.dst("SELECT count(*) FROM child") == [(3,)]
    assert pair.dst("SELECT count(*), min(v) FROM parent") == [(3, "old")]


def test_a_self_reference_counts_too(pair: Pair) -> None:
    pair.dst("CREATE TABLE tree (id int PRIMARY KEY, v text, up int REFERENCES tree)")
    with pytest.raises(load.ConfigError, match=r"tree_up_fkey"):
        pair.run(table="tree", mode="replace", replace_with="delete")


def test_cascade_true_truncates_what_references_it_and_says_so(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    pair.dst(CASCADING)
    pair.dst("ALTER TABLE child ADD PRIMARY KEY (id);"
             "CREATE TABLE grandchild (child_id int REFERENCES child);"
             "INSERT INTO grandchild VALUES (1)")
    caplog.set_level(logging.INFO)
    report = pair.run(table="parent", mode="replace", cascade=True)
    assert [d.status for d in report.destinations] == ["loaded"]
    assert pair.dst("SELECT count(*) FROM parent") == [(5,)]
    assert pair.dst("SELECT count(*) FROM child") == [(0,)]
    assert pair.dst("SELECT count(*) FROM grandchild") == [(0,)]
    said = caplog.text
    assert "TRUNCATE ... CASCADE empties every row of public.child, public.grandchild" in said, said


def test_cascade_true_deletes_and_says_per_constraint_what_happens(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    pair.dst(CASCADING)
    pair.dst("CREATE TABLE nullable (parent_id int REFERENCES parent ON DELETE SET NULL);"
             "INSERT INTO nullable VALUES (1)")
    caplog.set_level(logging.INFO)
    report = pair.run(table="parent", mode="replace", replace_with="delete", cascade=True)
    assert [d.status for d in report.destinations] == ["loaded"]
    assert pair.dst("SELECT count(*) FROM child") == [(0,)]
    assert pair.dst("SELECT parent_id FROM nullable") == [(None,)]
    said = caplog.text
    assert "public.child" in said and "ON DELETE CASCADE" in said, said
    assert "public.nullable" in said and "ON DELETE SET NULL" in said, said


def test_a_plain_key_with_cascade_true_and_delete_fails_when_rows_reference_it(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """Documented: a NO ACTION reference is checked by the DELETE itself; the load fails
    (rolled back) while referencing rows exist, and the log said so beforehand."""
    pair.dst("CREATE TABLE parent (id int PRIMARY KEY, v text); INSERT INTO parent VALUES (1, 'o');"
             "CREATE TABLE child (parent_id int REFERENCES parent); INSERT INTO child VALUES (1)")
    caplog.set_level(logging.INFO)
    report = pair.run(table="parent", mode="replace", replace_with="delete", cascade=True)
    (result,) = report.destinations
    assert result.status == "failed" and "ForeignKeyViolation" in (result.error or ""), result
    assert "ON DELETE NO ACTION" in caplog.text, caplog.text
    assert pair.dst("SELECT v FROM parent") == [("o",)]


INHERITING = """
CREATE TABLE base (id {id_type}, v text);
INSERT INTO base VALUES (100, 'own');
CREATE TABLE base_kid () INHERITS (base);
INSERT INTO base_kid VALUES (200, 'kid'), (201, 'kid');
"""


@pytest.mark.parametrize("method", ["truncate", "delete"])
@pytest.mark.parametrize("id_type", ["int", "bigint"])  # verified by the COPY stream, by text
def test_an_inheritance_parent_is_replaced_alone(pair: Pair, method: str, id_type: str) -> None:
    pair.dst(INHERITING.format(id_type=id_type))
    report = pair.run(table="base", mode="replace", replace_with=method)
    (result,) = report.destinations
    assert result.status == "loaded", result.error
    # Verified by the parent's own rows only (the children's would not match the source).
    assert result.checksum is not None and result.checksum.startswith("5:"), result
    assert ("copy-binary" in result.checksum) == (id_type == "int"), result
    assert pair.dst("SELECT id FROM ONLY base ORDER BY id") == [(i,) for i in range(1, 6)]
    assert pair.dst("SELECT count(*) FROM base_kid") == [(2,)]


def test_a_partitioned_table_is_replaced_whole(pair: Pair) -> None:
    pair.dst("CREATE TABLE parts (id int, v text) PARTITION BY RANGE (id);"
             "CREATE TABLE parts_low PARTITION OF parts FOR VALUES FROM (0) TO (3);"
             "CREATE TABLE parts_high PARTITION OF parts FOR VALUES FROM (3) TO (1000);"
             "INSERT INTO parts VALUES (1, 'old'), (500, 'old')")
    for method in ("truncate", "delete"):
        report = pair.run(table="parts", mode="replace", replace_with=method)
        assert [d.status for d in report.destinations] == ["loaded"], report.destinations
        assert pair.dst("SELECT id, v FROM parts ORDER BY id") == [
            (i, f"v{i}") for i in range(1, 6)
        ]


def test_cascade_is_checked_like_the_other_options() -> None:
    with pytest.raises(load.ConfigError, match=r"'cascade' must be"):
        load.Destination.from_value(
            {"conn_id": "c", "table": "t", "mode": "replace", "cascade": "yes please"}, 0
        )
    with pytest.raises(load.ConfigError, match=r"'cascade' is for mode='replace'"):
        load.Destination.from_value({"conn_id": "c", "table": "t", "cascade": True}, 0)
    spec = load.Destination.from_value(
        {"conn_id": "c", "table": "t", "mode": "replace", "cascade": True}, 0
    )
    assert spec.cascade is True and spec.as_mapping()["cascade"] is True
