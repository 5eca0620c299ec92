"""Session checks: refuse, before any COPY starts, sessions that would change the data.

The engine forwards COPY bytes as they are and leaves sessions to its caller, so the two
ends must read those bytes the same way:

* every database fitting must talk in one client encoding (text values travel in it in
  every format, binary included): otherwise the servers store other characters;
* in a binary copy, a receiver on a server of another major version must not fill a column
  of a type whose binary form or meaning changed between the two (``_versions.py``: an
  interval between 16 and 17, say), which it would read as another value;
* in a text or CSV copy, the source and each receiver must agree on the settings that
  change what a value written as text means (the ones pg_dump pins for the same reason,
  and ``lc_monetary`` for ``money``), and the source must write floats exactly
  (``extra_float_digits`` of 1 or more).

Settings the server reports (``client_encoding``, ``DateStyle``, ``IntervalStyle``,
``TimeZone``) are read from the connection at no cost; the rest take one small query per
connection, run on all of them at once, and only for a text or CSV copy. Fittings without
a database (iterators, callables) are exempt.

Left out on purpose: ``standard_conforming_strings`` (COPY's escapes do not depend on
it), ``bytea_output`` (bytea input reads both forms), ``timezone`` under an ISO DateStyle
(values carry their UTC offset), ``lc_numeric`` (numbers are written without it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from . import _versions
from ._errors import CopyUsageError, ProducerTimeout, ReceiverTimeout
from ._fittings import Receiver
from ._limits import ABORT_TIMEOUT
from ._statement import StatementProducer, _StatementFitting
from ._steps import Driver, Step

if TYPE_CHECKING:
    from ._fittings import Producer

# One round trip: what the server does not report. A money value rendered by the server
# shows everything lc_monetary changes (symbol, separators, fraction digits, sign), so two
# sessions that render it alike read each other's money alike, whatever their locale names.
_QUERY = (
    b"SELECT current_setting('extra_float_digits'), "
    b"(-1234567.891)::numeric::money::text"
)
_MONEY_SAMPLE = "-1234567.891::money"


def check_sessions(
    producer: Producer, receivers: Sequence[Receiver], *, timeout: float
) -> None:
    """Raise ``CopyUsageError`` if the fittings' sessions would change the data."""
    fittings = [f for f in (producer, *receivers) if isinstance(f, _StatementFitting)]
    _check_encodings(fittings)
    if not isinstance(producer, StatementProducer):
        return
    targets = [r for r in receivers if isinstance(r, _StatementFitting)]
    if not targets:
        return
    if producer.copy_format == "binary":
        _check_binary_across_versions(producer, targets, timeout)
        return
    settings = _query(fittings, timeout)
    fmt = producer.copy_format.upper()
    digits = int(settings[producer][0])
    if digits < 1:
        raise CopyUsageError(
            f"{producer!r} writes floats with extra_float_digits = {digits}: in a {fmt} copy "
            "they lose digits (0.30000000000000004 arrives as 0.3); set extra_float_digits "
            "to 1 or more on the source connection (pg_dump uses 3), or copy in binary"
        )
    for receiver in targets:
        _check_pair(producer, receiver, settings, fmt)


def _check_encodings(fittings: Sequence[_StatementFitting]) -> None:
    first = None
    for fitting in fittings:
        encoding = _reported(fitting, "client_encoding")
        if first is None:
            first = (fitting, encoding)
        elif encoding != first[1]:
            raise CopyUsageError(
                f"{first[0]!r} and {fitting!r} talk in different client encodings "
                f"({first[1]} against {encoding}): the bytes would be forwarded as they are "
                "and stored as other characters, in every COPY format; set one "
                "client_encoding on every connection (e.g. SET client_encoding = 'UTF8') "
                "and the servers convert"
            )


def _check_pair(
    producer: _StatementFitting,
    receiver: _StatementFitting,
    settings: dict[_StatementFitting, tuple[str, str]],
    fmt: str,
) -> None:
    def refuse(name: str, source: str | None, target: str | None, why: str) -> None:
        raise CopyUsageError(
            f"{producer!r} and {receiver!r} disagree on {name} ({source!r} against "
            f"{target!r}): in a {fmt} copy {why}; set {name} the same on both "
            "connections, or copy in binary"
        )

    source_ds, target_ds = _reported(producer, "DateStyle"), _reported(receiver, "DateStyle")
    # An ISO DateStyle writes year-month-day, which every DateStyle reads the same way;
    # the others write day and month in the session's order, and zones as abbreviations.
    if _norm(source_ds) != _norm(target_ds) and _style(source_ds) != "ISO":
        refuse("DateStyle", source_ds, target_ds, "dates would be read in another order")
    if _style(source_ds) != "ISO":
        source_tz, target_tz = _reported(producer, "TimeZone"), _reported(receiver, "TimeZone")
        if source_tz != target_tz:
            refuse(
                "TimeZone", source_tz, target_tz,
                f"with DateStyle {source_ds!r} times carry zone abbreviations, which the "
                "receiver would read in its own zone",
            )
    source_is, target_is = (_reported(f, "IntervalStyle") for f in (producer, receiver))
    if _norm(source_is) != _norm(target_is):
        refuse("IntervalStyle", source_is, target_is, "intervals would change sign or meaning")
    source_money, target_money = settings[producer][1], settings[receiver][1]
    if source_money != target_money:
        refuse(
            "lc_monetary", source_money, target_money,
            f"money would be read in another format ({_MONEY_SAMPLE} renders as "
            f"{source_money!r} and {target_money!r})",
        )


def _reported(fitting: _StatementFitting, name: str) -> str | None:
    return fitting.connection.info.parameter_status(name)


def _norm(value: str | None) -> str:
    return "".join((value or "").split()).upper()


def _style(datestyle: str | None) -> str:
    return _norm(datestyle).split(",")[0]


def _query(
    fittings: Sequence[_StatementFitting], timeout: float
) -> dict[_StatementFitting, tuple[str, str]]:
    """Run the settings query on every connection at once, with one deadline."""
    results = _run_all({f: _QUERY for f in fittings}, timeout, "its session settings")
    return {
        fitting: (row.get_value(0, 0).decode(), row.get_value(0, 1).decode())  # never NULL
        for fitting, row in results.items()
    }


def _run_all(
    queries: dict[_StatementFitting, bytes], timeout: float, what: str
) -> dict[_StatementFitting, Any]:
    """Run one query on each connection at once, with one deadline: their results."""
    deadline = time.monotonic() + timeout
    driver: Driver[_StatementFitting] = Driver(
        {f: Step(f._command(q), deadline) for f, q in queries.items()}
    )
    driver.run(stop_on_error=True)
    failed = [f for f, s in driver.finished.items() if s.error] + list(driver.expired)
    if not failed and not driver.pending:
        return {fitting: step.value for fitting, step in driver.finished.items()}
    # End what is still running, so every connection is left as it was found.
    ends: Driver[_StatementFitting] = Driver({
        f: Step(f.aborting(None), time.monotonic() + ABORT_TIMEOUT)
        for f in [*driver.pending, *driver.expired]
    })
    ends.run()
    for fitting in ends.expired:
        fitting.abandon()
    culprit = failed[0] if failed else next(iter(driver.pending))
    failure = driver.finished.get(culprit)
    if failure is not None and failure.error is not None:
        raise CopyUsageError(
            f"{culprit!r}: could not read {what}: {failure.error}"
        ) from failure.error
    error = ReceiverTimeout if isinstance(culprit, Receiver) else ProducerTimeout
    raise error(f"{culprit!r}: its server did not answer in {timeout:g} s")


def _check_binary_across_versions(
    producer: StatementProducer, targets: Sequence[_StatementFitting], timeout: float
) -> None:
    """Refuse a binary copy into a server of another major version where a column's type
    (or a type inside it) changed its binary form or meaning between the two
    (:mod:`._versions`): the receiver would read the bytes as another value, silently.

    Costs nothing between servers of one version, or of versions no listed change lies
    between; otherwise one catalog query per such receiver, on the types of the columns
    its COPY names (or all of its table's, where they cannot be read from the statement)."""
    source = producer.connection.info.server_version
    spans = {
        r: r.connection.info.server_version
        for r in targets
        if _versions.changes_between(_versions.major(source), _versions.major(
            r.connection.info.server_version))
    }
    queries = {r: q for r in spans if (q := _types_query(r)) is not None}
    if not queries:
        return
    results = _run_all(queries, timeout, "the types of its table's columns")
    for receiver, result in results.items():
        for row in range(result.ntuples):
            column, type_name = (result.get_value(row, i).decode() for i in (0, 1))
            change = _versions.binary_change(
                type_name, _versions.major(source), _versions.major(spans[receiver])
            )
            if change is not None:
                raise CopyUsageError(
                    f"{producer!r} (PostgreSQL {_versions.describe(source)}) and {receiver!r} "
                    f"(PostgreSQL {_versions.describe(spans[receiver])}): column {column} "
                    f"holds {type_name}, whose binary form differs between these versions "
                    f"({change.why}, since {change.since}: {change.source}); copy in text "
                    "or CSV, which the receiver checks"
                )


def _types_query(receiver: _StatementFitting) -> bytes | None:
    """The catalog query for the built-in types in the columns the receiver's ``COPY
    table [(columns)] FROM STDIN`` fills, or None if the statement names no table."""
    target = _versions.copy_target(receiver._text)
    if target is None:
        return None
    table, columns = target
    with psycopg.ClientCursor(receiver.connection) as cursor:
        text = cursor.mogrify(_versions.COLUMN_TYPES_SQL, {"table": table, "columns": columns})
    return text.encode(receiver.connection.info.encoding)
