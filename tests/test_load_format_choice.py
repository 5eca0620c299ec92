"""The automatic format (``format=None``) and a forced ``format="binary"`` against a type
with no binary input/output (``aclitem``, ``aclitem[]``): the first copies in text, the
second is refused before anything moves, naming the column."""

from __future__ import annotations

import pytest

from airflow_copyman import load
from tests.conftest import Database
from tests.test_readback import endpoint

ACL = "format('%s=r/%s', current_user, current_user)::aclitem"


def make_tables(pair: tuple[Database, Database]) -> None:
    source_db, dest_db = pair
    source_db.execute(f"CREATE TABLE grants AS SELECT g AS id, {ACL} AS acl, "
                      f"ARRAY[{ACL}] AS acls FROM generate_series(1, 3) g")
    dest_db.execute("CREATE TABLE grants (id int, acl aclitem, acls aclitem[])")


def copy_grants(pair: tuple[Database, Database], fmt: str | None) -> load.TransferReport:
    source_db, dest_db = pair
    return load.run(
        endpoint(source_db, "src"), "grants", [{"conn_id": "dst", "table": "grants"}],
        endpoints={"dst": endpoint(dest_db, "dst")}, format=fmt,
    )


def test_a_type_without_binary_io_makes_the_automatic_format_text(
    pair: tuple[Database, Database],
) -> None:
    make_tables(pair)
    report = copy_grants(pair, None)
    (result,) = report.destinations
    assert (report.format, result.status, result.rows) == ("text", "loaded", 3), result
    assert pair[1].scalar("SELECT count(*) FROM grants WHERE acls[1] = acl") == 3


def test_an_array_of_a_type_without_binary_io_makes_it_text_too(
    pair: tuple[Database, Database],
) -> None:
    make_tables(pair)
    report = load.run(
        endpoint(pair[0], "src"), "SELECT id, acls FROM grants",
        [{"conn_id": "dst", "table": "grants", "columns": ["id", "acls"]}],
        endpoints={"dst": endpoint(pair[1], "dst")},
    )
    assert (report.format, report.destinations[0].status) == ("text", "loaded")


def test_forced_binary_is_refused_naming_the_column(pair: tuple[Database, Database]) -> None:
    make_tables(pair)
    with pytest.raises(load.ConfigError, match=r"column acl aclitem: its type has no binary"):
        copy_grants(pair, "binary")
    assert pair[1].scalar("SELECT count(*) FROM grants") == 0
