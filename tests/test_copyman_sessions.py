"""Session checks: a copy whose ends would read the bytes differently is refused before
any COPY starts (issue 8), and allowed where the format makes the setting irrelevant."""

from __future__ import annotations

import psycopg
import pytest

from airflow_copyman import copyman
from tests.conftest import Databases

FORMATS = ["text", "csv", "binary"]

_TABLE = "CREATE TABLE vals (id int PRIMARY KEY, d date, i interval, f float8, ts timestamptz)"
_ROWS = """INSERT INTO vals VALUES
    (1, '2000-02-01', '-1 day -02:03:04', 0.30000000000000004, '2000-02-01 12:00+02'),
    (2, '1999-12-31', '1 year 2 mons', 1e-300, '1999-12-31 23:59:59.123456+00')"""


def _ends(dbs: Databases) -> tuple[psycopg.Connection, psycopg.Connection]:
    src, dst = dbs.new("src"), dbs.new("dst")
    src.execute(_TABLE)
    src.execute(_ROWS)
    src.commit()
    dst.execute(_TABLE)
    dst.commit()
    return src, dst


def _copy(src: psycopg.Connection, dst: psycopg.Connection, fmt: str) -> None:
    copyman.transfer(
        (src, f"COPY vals TO STDOUT (FORMAT {fmt})"),
        (dst, f"COPY vals FROM STDIN (FORMAT {fmt})"),
    )
    dst.commit()


def _rows(conn: psycopg.Connection) -> list[tuple[object, ...]]:
    # Binary results: what the values are, whatever the session writes in text.
    rows = conn.cursor(binary=True).execute("SELECT * FROM vals ORDER BY id").fetchall()
    conn.rollback()
    return rows


def _refused(src: psycopg.Connection, dst: psycopg.Connection, fmt: str, *match: str) -> None:
    """Refused with every piece of ``match`` in the message, and nothing started anywhere."""
    with pytest.raises(copyman.CopyUsageError) as refused:
        _copy(src, dst, fmt)
    for piece in match:
        assert piece in str(refused.value)
    for conn in (src, dst):
        # No transaction was even begun: no COPY ran, nothing moved.
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert _rows(dst) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_differing_client_encodings_are_refused_in_every_format(
    dbs: Databases, fmt: str
) -> None:
    src, dst = _ends(dbs)
    src.execute("SET client_encoding = 'LATIN1'")
    src.commit()
    _refused(
        src, dst, fmt, "client encodings", "LATIN1 against UTF8",
        "StatementProducer(", "StatementReceiver(",
    )


@pytest.mark.parametrize(
    ("setting", "value"),
    [("DateStyle", "SQL, DMY"), ("IntervalStyle", "sql_standard")],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_settings_that_change_text_values_must_agree_in_text_and_csv(
    dbs: Databases, fmt: str, setting: str, value: str
) -> None:
    src, dst = _ends(dbs)
    src.execute(f"SET {setting} = '{value}'")
    src.commit()
    if fmt == "binary":
        _copy(src, dst, fmt)  # binary values do not depend on the setting
        assert _rows(dst) == _rows(src)
        return
    _refused(src, dst, fmt, f"disagree on {setting}", repr(value), fmt.upper())


def test_an_iso_datestyle_is_read_alike_whatever_the_field_order(dbs: Databases) -> None:
    src, dst = _ends(dbs)
    src.execute("SET DateStyle = 'ISO, DMY'")
    src.commit()
    dst.execute("SET DateStyle = 'ISO, MDY'")
    dst.commit()
    _copy(src, dst, "text")
    assert _rows(dst) == _rows(src)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_source_writing_lossy_floats_is_refused_in_text_and_csv(
    dbs: Databases, fmt: str
) -> None:
    src, dst = _ends(dbs)
    src.execute("SET extra_float_digits = 0")
    src.commit()
    if fmt == "binary":
        _copy(src, dst, fmt)
        assert _rows(dst) == _rows(src)
        return
    _refused(src, dst, fmt, "extra_float_digits = 0", "StatementProducer(")


def test_lc_monetary_is_compared_by_what_it_renders(dbs: Databases) -> None:
    """Two locale names with the same money format read each other's money alike."""
    src, dst = _ends(dbs)
    src.execute("SET lc_monetary = 'C.utf8'")
    src.commit()
    dst.execute("SET lc_monetary = 'C'")
    dst.commit()
    _copy(src, dst, "csv")
    assert _rows(dst) == _rows(src)


def test_fittings_without_a_database_are_exempt(dbs: Databases) -> None:
    _, dst = _ends(dbs)
    dst.execute("SET DateStyle = 'SQL, DMY'")
    dst.commit()
    rows, _ = copyman.transfer(
        copyman.IteratorProducer([[b"7\t2000-02-01\t1 day\t0.5\t\\N\n"]]),
        (dst, "COPY vals FROM STDIN"),
    )
    dst.commit()
    assert rows == 1
