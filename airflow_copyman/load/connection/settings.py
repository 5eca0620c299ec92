"""The session settings every CopyMan connection runs with, so that values travel, not renderings.

COPY's text and CSV formats write values as the session renders them, and the receiving
session reads them back by its own settings: a source whose database says
``DateStyle = 'SQL, DMY'`` writes 2000-02-01 as ``01/02/2000``, which a session in the
default MDY order reads as January 2nd. Text values (in every format, binary included)
travel in the session's client encoding. So every connection the provider opens gets the
same settings, the ones pg_dump pins on its own sessions for the same reason:

- ``client_encoding = UTF8``: each server converts from and to its own encoding, and a
  character a destination's encoding cannot hold fails there (SQLSTATE 22P05) instead of
  arriving as other characters;
- ``DateStyle = ISO, MDY`` and ``IntervalStyle = postgres``: renderings every server reads
  back to the same value;
- ``extra_float_digits = 3``: floats written exactly (shortest round-trip form);
- ``lc_monetary = C``: ``money`` written and read with the same symbols and two decimals,
  so its stored integer survives whatever each database's default;
- ``xmloption = content``: every XML value the source holds can be read back.

They are sent as libpq startup options after the connection's own ``options`` extra, so
they override it, ``ALTER DATABASE/ROLE ... SET`` and ``PGCLIENTENCODING`` alike (settings a
client sends at startup take precedence over those). A connection where one is not in force
after all (a pooler that drops startup options, say) is refused.

``TimeZone`` and ``search_path`` are left alone: they change what a query *means* (its
``now()::date``, its table names), which is the DAG author's to decide, and ISO timestamps
carry their offset, so a ``timestamptz`` reads back the same in any time zone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

#: Setting -> the value pinned on every connection.
PINNED: Mapping[str, str] = {
    "client_encoding": "UTF8",
    "DateStyle": "ISO,MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "lc_monetary": "C",
    "xmloption": "content",
}
#: How the server shows a pinned value (SHOW, ParameterStatus), where it differs.
_SHOWN = {"DateStyle": "ISO, MDY"}
#: Settings the server reports at startup (ParameterStatus): checked without a query.
_REPORTED = frozenset({"client_encoding", "DateStyle", "IntervalStyle"})


class SessionSettingsError(psycopg.ProgrammingError):
    """A pinned session setting is not in force on a new connection (no retry fixes it)."""


def startup_options(user_options: str | None) -> str:
    """The libpq ``options`` to connect with: the connection's own, then ours (later
    ``-c`` switches override earlier ones)."""
    ours = " ".join(f"-c {name}={value}" for name, value in PINNED.items())
    user = (user_options or "").strip()
    return f"{user} {ours}" if user else ours


def connect_args(conn_args: Mapping[str, Any]) -> dict[str, Any]:
    """``conn_args`` (the libpq keywords PostgresHook built) with the pinned settings."""
    args = dict(conn_args)
    # The keyword also wins over PGCLIENTENCODING, which libpq reads only when it is unset.
    args["client_encoding"] = PINNED["client_encoding"]
    args["options"] = startup_options(args.get("options"))
    return args


def check(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`SessionSettingsError` unless every pinned setting is in force.

    Leaves the connection idle (no transaction open)."""
    shown = {name: conn.info.parameter_status(name) for name in _REPORTED}
    queried = [name for name in PINNED if name not in _REPORTED]
    was_idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    row = conn.execute(
        "SELECT " + ", ".join(f"current_setting('{name}')" for name in queried)  # type: ignore[arg-type]
    ).fetchone()
    if was_idle and not conn.autocommit:
        conn.rollback()
    shown.update(zip(queried, row or (), strict=False))
    wrong = [
        f"{name} is {shown.get(name)!r}"
        for name, value in PINNED.items()
        if (shown.get(name) or "").lower() != _SHOWN.get(name, value).lower()
    ]
    if wrong:
        raise SessionSettingsError(
            "the session settings CopyMan pins at connection time are not in force ("
            + ", ".join(wrong)
            + f"; wanted {', '.join(f'{k}={v}' for k, v in PINNED.items())}): values could "
            "arrive changed. A connection pooler that drops libpq startup options does this; "
            "connect to the server directly or let the pooler pass 'options' through"
        )
