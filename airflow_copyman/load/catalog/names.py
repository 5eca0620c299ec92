"""SQL names as a DAG author writes them: a table (``schema.table``, quoted where needed),
a column, and the error for one that is not a name. Pure: no server involved."""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

_IDENT = r'(?:[A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*|"(?:[^"]|"")+")'
_TABLE_NAME = re.compile(rf"\A\s*({_IDENT})(?:\s*\.\s*({_IDENT}))?\s*;?\s*\Z")
COLUMN_NAME = re.compile(rf"\A\s*({_IDENT})\s*\Z")
# A bare word that is an SQL keyword is never taken for a table name ("TABLE", "VALUES"...).
_KEYWORDS = frozenset({"select", "with", "table", "values", "copy", "insert", "update", "delete"})


class PlanError(ValueError):
    """Bad input found while planning (no destination has been written)."""


def unquote(ident: str) -> str:
    """An identifier as PostgreSQL resolves it: quoted names exactly, others folded."""
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


@dataclass(frozen=True)
class TableName:
    """A possibly schema-qualified table name, as PostgreSQL resolves it."""

    schema: str | None
    name: str

    @classmethod
    def parse(cls, text: str) -> TableName | None:
        """The table ``text`` names (``orders``, ``public.orders``, ``"My"."Table"``), or None
        if ``text`` is not a table name (a query, for instance)."""
        match = _TABLE_NAME.match(text)
        if match is None:
            return None
        first, second = match.group(1), match.group(2)
        if second is None and first.lower() in _KEYWORDS:
            return None
        if second is None:
            return cls(None, unquote(first))
        return cls(unquote(first), unquote(second))

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name) if self.schema else sql.Identifier(self.name)

    @property
    def regclass_text(self) -> str:
        """The name as ``to_regclass`` reads it (quoted, so exactly this table)."""
        return ".".join(quote_ident(p) for p in (self.schema, self.name) if p is not None)

    def __str__(self) -> str:
        return self.regclass_text


def quote_ident(ident: str) -> str:
    """``ident`` as a quoted SQL identifier, for text read by the server (``to_regclass``)."""
    return '"' + ident.replace('"', '""') + '"'


def parse_table(text: str, what: str = "table") -> TableName:
    table = TableName.parse(text) if isinstance(text, str) else None
    if table is None:
        raise PlanError(f"{what} {text!r} is not a table name (schema.table, quoted if needed)")
    return table
