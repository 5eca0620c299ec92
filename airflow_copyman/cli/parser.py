"""The arguments of ``copyman`` (argparse: a usage error exits with status 2)."""

from __future__ import annotations

import argparse
import textwrap

from airflow_copyman import __version__

DSN_HELP = (
    "DSNs are libpq connection strings or URLs ('host=db1 dbname=sales user=reader', "
    "postgresql://reader@db1/sales, service=NAME), or env:VAR to read one from an environment "
    "variable. Passwords come from PGPASSWORD, ~/.pgpass or the service file: none is needed "
    "on the command line, and none is ever printed."
)

MAIN_EXAMPLE = """\
examples:
  copyman copy postgresql://reader@db1/sales 'SELECT * FROM orders' \\
      service=warehouse public.orders --mode merge --key id
  copyman run orders.toml --load-id "orders-$(date +%F)" --json

exit status: 0 loaded (or loaded before), 1 failed for good or refused (nothing written),
75 every failure may pass (retry later), 2 usage, 130/143 stopped by SIGINT/SIGTERM
(every COPY stopped, nothing committed).
"""

COPY_EXAMPLE = """\
example:
  export PGPASSWORD=...      # or ~/.pgpass, or a service file
  copyman copy env:SALES_DSN \\
      'SELECT * FROM orders WHERE day = %(day)s' -p day=2026-12-07 \\
      'host=db2 dbname=warehouse user=loader' public.orders \\
      --mode merge --key id --verify checksum --load-id orders-2026-12-07
"""

RUN_EXAMPLE = """\
example: copyman run orders.toml --json, with orders.toml:

  source = "env:SALES_DSN"    # or { dsn = "...", name = "sales" }
  sql = "SELECT * FROM orders WHERE day = %(day)s"
  parameters = { day = "2026-12-07" }
  verify = "checksum"     # also: format, receiver_timeout, lock_timeout, min_rows,
                          #       max_bytes_per_second, load_id
  [[destinations]]
  name = "warehouse"      # optional: the endpoint's name in labels and the ledger
  dsn = "service=warehouse"
  table = "public.orders"
  mode = "merge"
  key = ["id"]

  [[destinations]]
  dsn = "postgresql://loader@db3/reporting"
  table = "orders"
  mode = "replace"
  create = "if_missing"

The command line's options win over the file's.
"""


def _load_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the load")
    group.add_argument("--format", choices=("binary", "text", "csv"),
                       help="COPY format (default: binary where exact, else text)")
    group.add_argument("--verify", choices=("count", "checksum"),
                       help="compare row counts (default), or a checksum of the rows too")
    group.add_argument("--max-bytes-per-second", type=float, metavar="N",
                       help="read at most N bytes a second from the source")
    group.add_argument("--receiver-timeout", type=float, metavar="SECONDS",
                       help="deadline of every statement and of the copy's silences")
    group.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                       help="deadline of every lock wait in a destination")
    group.add_argument("--min-rows", type=int, metavar="N",
                       help="fewer rows from the source fail the load (transient)")
    group.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a query parameter, for %%(NAME)s in SQL (repeatable)")
    group.add_argument("--load-id", metavar="ID",
                       help="record each destination loaded under ID (a ledger table in its "
                       "database): a rerun with the same ID loads only what is not loaded yet")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print the report on stdout as one JSON object")
    out.add_argument("-q", "--quiet", action="store_true",
                     help="print nothing on success (failures still go to stderr)")


def _destination_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the destination")
    group.add_argument("--mode", choices=("append", "replace", "merge"), default="append",
                       help="append (default), replace the table's rows, or merge by --key")
    group.add_argument("--key", action="append", metavar="COLUMN",
                       help="a merge key column (repeatable, in the key's order)")
    group.add_argument("--key-nulls", choices=("refuse", "match"),
                       help="merge: refuse a NULL key (default) or match NULLs as equal")
    group.add_argument("--replace-with", choices=("truncate", "delete"),
                       help="replace: TRUNCATE (default) or DELETE (readers keep reading)")
    group.add_argument("--cascade", action="store_true",
                       help="replace a table other tables reference, reaching them too")
    group.add_argument("--create", choices=("never", "if_missing"),
                       help="create the table from the query's columns if it is missing")
    group.add_argument("--columns", metavar="A,B,...",
                       help="the table's columns to fill, in the order of the query's")
    group.add_argument("--preoperator", action="append", metavar="SQL",
                       help="SQL run in the load's transaction before the COPY (repeatable)")
    group.add_argument("--postoperator", action="append", metavar="SQL",
                       help="SQL run in the load's transaction after the COPY (repeatable)")


def _wrapped(text: str) -> str:
    # RawDescriptionHelpFormatter keeps the examples' lines; the prose is wrapped here.
    return textwrap.fill(text, width=88)


def build() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="copyman",
        description=_wrapped(
            "Stream a PostgreSQL query (COPY TO) into tables of other PostgreSQL databases "
            "(COPY FROM), in one pass, each destination in one transaction. " + DSN_HELP
        ),
        epilog=MAIN_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"copyman {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    copy = commands.add_parser(
        "copy", help="copy a query into one table",
        description=_wrapped(
            "Copy the rows of SQL (a query or a table name) from SOURCE into TABLE of DEST. "
            + DSN_HELP
        ),
        epilog=COPY_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    copy.add_argument("source", metavar="SOURCE", help="the source's DSN")
    copy.add_argument("sql", metavar="SQL", help="a query, or a table name")
    copy.add_argument("dest", metavar="DEST", help="the destination's DSN")
    copy.add_argument("table", metavar="TABLE", help="the table (schema.table, SQL syntax)")
    _destination_options(copy)
    _load_options(copy)
    run = commands.add_parser(
        "run", help="run a load file: one query into many tables",
        description=_wrapped(
            "Copy the rows of a query into every destination of a TOML load file, in one "
            "pass. " + DSN_HELP
        ),
        epilog=RUN_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("loadfile", metavar="LOADFILE.toml", help="the load file")
    _load_options(run)
    return parser
