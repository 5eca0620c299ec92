"""``copyman copy`` and ``copyman run``: build the load, run it, print, exit."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

from airflow_copyman import load
from airflow_copyman.cli import exits, loadfile, parser, progress, request
from airflow_copyman.cli.request import LoadRequest, UsageError
from airflow_copyman.cli.running import Ran, run_stoppably

#: The load options on the command line, by their LoadOptions names.
OPTION_ARGS = (
    "format", "verify", "receiver_timeout", "lock_timeout", "min_rows", "max_bytes_per_second",
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser.build().parse_args(argv)  # exits 2 on a usage error
    try:
        built = from_copy(args) if args.command == "copy" else from_run(args)
    except UsageError as exc:
        print(f"copyman: error: {exc}", file=sys.stderr)
        return exits.USAGE
    return execute(built, quiet=args.quiet, as_json=args.json)


def from_copy(args: argparse.Namespace) -> LoadRequest:
    source = request.endpoint(args.source, "SOURCE", "source")
    dest = request.endpoint(args.dest, "DEST")
    given = {
        "mode": args.mode, "key": args.key, "key_nulls": args.key_nulls,
        "replace_with": args.replace_with, "create": args.create,
        "preoperator": args.preoperator, "postoperator": args.postoperator,
        "cascade": args.cascade or None,
        "columns": [c.strip() for c in args.columns.split(",")] if args.columns else None,
    }
    destination = {"conn_id": dest.name, "table": args.table}
    destination.update({k: v for k, v in given.items() if v is not None})
    return _request(
        source, args.sql, [destination], {dest.name: dest},
        options=_options(args, {}, request.parameters(args.param) or None),
        load_id=args.load_id,
    )


def from_run(args: argparse.Namespace) -> LoadRequest:
    spec = loadfile.read(args.loadfile)
    parameters: Any = spec.parameters
    if args.param:
        if isinstance(parameters, list):
            raise UsageError("-p NAME=VALUE names a parameter: the load file's are a list")
        parameters = {**(parameters or {}), **request.parameters(args.param)}
    return _request(
        spec.source, spec.sql, spec.destinations, spec.endpoints,
        options=_options(args, spec.options, parameters),
        load_id=args.load_id if args.load_id is not None else spec.load_id,
    )


def _options(args: argparse.Namespace, base: dict[str, Any], parameters: Any) -> dict[str, Any]:
    """The file's options, with the command line's over them."""
    given = {name: getattr(args, name) for name in OPTION_ARGS}
    return {**base, **{k: v for k, v in given.items() if v is not None}, "parameters": parameters}


def _request(
    source: load.Endpoint,
    sql: str,
    destinations: list[dict[str, Any]],
    endpoints: dict[str, load.Endpoint],
    *,
    options: dict[str, Any],
    load_id: str | None,
) -> LoadRequest:
    if not sql.strip():
        raise UsageError("SQL is empty: give a query or a table name")
    return LoadRequest(
        source=source,
        sql=sql,
        destinations=request.destinations(destinations),
        endpoints=endpoints,
        options=request.options(options),
        ledger=request.ledger(load_id),
        secrets=request.secrets_of([source, *endpoints.values()]),
    )


def execute(built: LoadRequest, *, quiet: bool, as_json: bool) -> int:
    display = progress.display(quiet=quiet, secrets=built.secrets)
    # The load reports as often as the display shows it (a plain line: under 5 s).
    options = dataclasses.replace(
        built.options,
        progress_interval=display.interval,
        on_progress=display.on_progress if display.wants_progress() else None,
    )
    try:
        transfer = load.Transfer(
            built.source, built.sql, built.destinations, endpoints=built.endpoints,
            ledger=built.ledger, log=display.log, options=options,
        )
    except load.ConfigError as exc:
        display.line(f"copyman: error: {exc}")
        return exits.USAGE
    display.start()
    try:
        ran = run_stoppably(transfer, display.tick)
    finally:
        display.stop()
    if ran.report is not None and as_json:
        print(json.dumps(ran.report.as_dict(), default=str), flush=True)
    return finish(ran, display, quiet=quiet)


def finish(ran: Ran, display: progress.Display, *, quiet: bool) -> int:
    """One line per failure on stderr; the exit status."""
    if ran.refused is not None:
        for problem in _problems(ran.refused):
            display.line(f"copyman: refused, nothing was written: {problem}")
        return exits.FAILED if ran.signum is None else exits.for_signal(ran.signum)
    if ran.error is not None:
        display.line(f"copyman: failed: {type(ran.error).__name__}: {_one_line(ran.error)}")
        return exits.FAILED if ran.signum is None else exits.for_signal(ran.signum)
    report = ran.report
    assert report is not None
    for result in report.failed:
        kind = "for good" if result.permanent else "may pass, retry later"
        display.line(f"copyman: {result.label}: failed ({kind}): {_one_line(result.error)}")
    if ran.signum is not None:
        committed = [r.label for r in report.destinations if r.status == "loaded"]
        done = f"committed before it: {', '.join(committed)}" if committed else (
            "nothing was committed"
        )
        display.line(f"copyman: stopped by {_signal_name(ran.signum)}; {done}")
        return exits.for_signal(ran.signum)
    if not report.failed:
        if not quiet:
            display.line(_summary(report))
        return exits.OK
    return exits.FAILED if any(r.permanent for r in report.failed) else exits.TEMPFAIL


def _summary(report: load.TransferReport) -> str:
    counts: dict[str, int] = {}
    for result in report.destinations:
        counts[result.status] = counts.get(result.status, 0) + 1
    states = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in counts.items())
    return f"copyman: done in {report.seconds:.1f} s: {report.rows} rows; {states}"


def _problems(refusal: load.ConfigError) -> list[str]:
    """Each problem of a refusal (the load joins those it found with "; "), one line each."""
    return re.split(r"; (?=destination #\d|source )", _one_line(refusal))


def _one_line(error: object) -> str:
    return " | ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name
