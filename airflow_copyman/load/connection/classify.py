"""Which failures a retry can fix, and how to describe a failure without leaking secrets.

A task should spend its retries only on failures that may go away by themselves: a lost
connection, a server restarting or short of resources, a time-out, a serialization
failure or deadlock. An undefined table or column, a type mismatch, bad data, a violated
constraint, a permission denied or bad SQL fails the same way on every try. The
classification goes by SQLSTATE class (PostgreSQL Appendix A), which psycopg exposes on
every server error; errors without one are client-side (connection lost: transient).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote

import psycopg

from airflow_copyman import copyman

#: What ``CREATE TABLE [IF NOT EXISTS]`` raises when another transaction creates the same name
#: at the same moment: the catalog's unique index (waiting for the other's commit), or, when
#: the other commits between the name check and the row type's, "type ... already exists".
#: Seen in about one loser in ten of eight sessions creating one table at once.
CREATED_CONCURRENTLY: tuple[type[psycopg.Error], ...] = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.DuplicateTable,
    psycopg.errors.DuplicateObject,
)

#: SQLSTATE classes (first two characters) that no retry can fix.
PERMANENT_CLASSES = frozenset(
    {
        "0A",  # feature not supported
        "22",  # data exception (bad value, type mismatch in the data)
        "23",  # integrity constraint violation
        "26",  # invalid SQL statement name
        "28",  # invalid authorization specification
        "2B",  # dependent privilege descriptors still exist
        "34",  # invalid cursor name
        "38",  # external routine exception
        "39",  # external routine invocation exception
        "3D",  # invalid catalog (database) name
        "3F",  # invalid schema name
        "42",  # syntax error or access rule violation (undefined table/column, permission)
        "44",  # WITH CHECK OPTION violation
        "P0",  # PL/pgSQL error (RAISE EXCEPTION in a preoperator, say)
    }
)

#: SQLSTATEs of otherwise retryable classes that no retry can fix.
PERMANENT_STATES = frozenset(
    {
        "25006",  # read_only_sql_transaction: the source query tried to write (setval...)
    }
)

_REFUSED_FOR_GOOD = re.compile(
    r"password authentication failed|authentication failed for user|"
    r"(?:database|role) \"[^\"]*\" does not exist|no pg_hba\.conf entry|"
    r"invalid (?:connection option|URI query parameter)|password is required|"
    r"server does not support SSL|SSL (?:is )?required|sslmode value .* invalid",
    re.IGNORECASE,
)


def sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_permanent(exc: BaseException) -> bool:
    """Whether ``exc`` will happen again on a retry (True) or may go away (False)."""
    state = sqlstate(exc)
    if state is not None:
        return state[:2] in PERMANENT_CLASSES or state in PERMANENT_STATES
    marked = getattr(exc, "permanent", None)
    if isinstance(marked, bool):  # the load layer's own errors say it themselves
        return marked
    if isinstance(exc, copyman.CopyUsageError):
        # The copy was set up wrongly (sessions that disagree, a statement of the wrong
        # kind): the same set-up fails the same way on every try.
        return True
    if isinstance(exc, copyman.RowCountMismatch):
        # The destination kept a different number of rows than it was sent (a trigger or
        # rule dropping rows): the next try would do the same.
        return True
    if isinstance(exc, psycopg.OperationalError) and _REFUSED_FOR_GOOD.search(str(exc)):
        # Connection-time refusals come without SQLSTATE: a wrong password, an unknown
        # role or database, no pg_hba.conf entry. Retrying with the same settings fails.
        return True
    # Client-side misuse (an invalid connection option in a connection's extra, say) is
    # permanent; OperationalError without SQLSTATE (connection lost or refused),
    # InterfaceError, time-outs, OS errors and cancellation may go away.
    return isinstance(exc, psycopg.ProgrammingError | psycopg.NotSupportedError)


def describe(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """One line saying what failed: ``Class [SQLSTATE]: the message``, then the server's
    DETAIL, HINT and CONTEXT (for a COPY, the line it failed on) where it sent them, with
    every secret (and its URL-encoded form) replaced by ``***``."""
    lines = str(exc).strip().splitlines()
    message = lines[0].strip() if lines else ""
    if isinstance(exc, copyman.CopyFail | copyman.ReceiverFault) and exc.__cause__ is not None:
        return describe(exc.__cause__, secrets)
    state = sqlstate(exc)
    name = type(exc).__name__
    head = f"{name} [{state}]" if state else name
    text = f"{head}: {message}" if message else head
    diag = getattr(exc, "diag", None)
    if isinstance(exc, psycopg.Error) and diag is not None:
        for label, value in (
            ("DETAIL", diag.message_detail),
            ("HINT", diag.message_hint),
            ("CONTEXT", diag.context),
        ):
            if value:
                text += f"; {label}: {' '.join(value.split())}"
    return redact(text, secrets)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            text = text.replace(form, "***")
    # A connection string the message might quote ("password=..." in a DSN).
    return _PASSWORD_IN_DSN.sub(r"\1***", text)


_PASSWORD_IN_DSN = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
