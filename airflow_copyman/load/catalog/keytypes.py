"""Whether a merge key's type has the equality a merge needs, asked of the catalog.

A merge matches staged rows to the table's with ``=`` on the key and finds a key given twice
with a unique btree index on the staging table: both need the type's default btree operator
class. ``json``, ``xml`` or ``point`` have none, and the merge failed only after the whole
copy with an operator-class message. Planning asks the destination's catalog instead, as
the server's own look-up does (no type names hard-coded here): a default btree operator class
for the type itself or for a type it is binary-coercible to (``varchar`` uses ``text``'s);
arrays and composites compare element by element, so theirs must have one; enums, ranges
and multiranges always do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

_TYPE = """
SELECT t.typtype::text, t.typcategory::text, t.typelem::int, t.typrelid::int,
       t.typbasetype::int,
       EXISTS (
           SELECT FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod
           WHERE am.amname = 'btree' AND oc.opcdefault
             AND (oc.opcintype = t.oid OR EXISTS (
                 SELECT FROM pg_cast c
                 WHERE c.castsource = t.oid AND c.casttarget = oc.opcintype
                   AND c.castmethod = 'b' AND c.castcontext = 'i')))
FROM pg_type t WHERE t.oid = %s
"""
_FIELDS = (
    "SELECT atttypid::int FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
    "AND NOT attisdropped"
)
#: Types whose btree operator class is polymorphic (anyenum, anyrange, anymultirange):
#: an enum's labels, a range's subtype (a range type needs a btree class for it) compare.
_ALWAYS_COMPARABLE = frozenset({"e", "r", "m"})
#: Deeper nesting than this is taken as comparable (the server still checks at the merge).
_MAX_DEPTH = 8


def has_equality(conn: psycopg.Connection[Any], type_oid: int, depth: int = 0) -> bool:
    """Whether values of the type compare with a default btree operator class."""
    row = conn.execute(_TYPE, [type_oid]).fetchone()
    if row is None or depth > _MAX_DEPTH:
        return True
    kind, category, element, relation, base, direct = row
    if direct or kind in _ALWAYS_COMPARABLE:
        return True
    if kind == "d":
        return has_equality(conn, base, depth + 1)
    if category == "A" and element:
        return has_equality(conn, element, depth + 1)
    if kind == "c":
        fields = [r[0] for r in conn.execute(_FIELDS, [relation]).fetchall()]
        return all(has_equality(conn, field, depth + 1) for field in fields)
    return False


def refusal(
    conn: psycopg.Connection[Any], key: Sequence[tuple[str, str]], *, created: bool
) -> str | None:
    """Why the merge cannot key on these columns (name, type as ``format_type`` writes it,
    resolved on this server), or None. ``created``: the table is created from the source's
    columns (the query is where to cast)."""
    for column, type_name in key:
        row = conn.execute("SELECT to_regtype(%s)::oid::int", [type_name]).fetchone()
        if row is None or row[0] is None:
            continue  # a type this server lacks fails the create, naming it
        if not has_equality(conn, row[0]):
            where = (
                "cast it in the query (to jsonb or text, for instance), so that the table "
                "is created with a comparable type"
                if created
                else "key on a column of a comparable type (jsonb or text, for instance), "
                "or change the column's type"
            )
            return (
                f"the merge key column {column!r} is of type {type_name}, which has no "
                f"equality the merge can use (no default btree operator class): {where}"
            )
    return None
