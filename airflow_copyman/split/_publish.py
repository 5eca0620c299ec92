"""Publishing a split load into one destination: one transaction.

In that transaction: the ledger says whether this lineage published already (a retry after
a lost COMMIT reply then changes nothing); the staging table must hold exactly the rows the
ranges' ledger rows report (and every range must have one); the mode applies (replace: the
table's rows become the staged rows; merge: the staged rows update and insert by the key;
append: the staged rows are added); the ledger row is written and the staging table
dropped. Readers see the old rows until the commit. Imports no Airflow module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from airflow_copyman import load
from airflow_copyman.split import _adapters
from airflow_copyman.split._staging import Target, _set_lock_timeout, create_like_staging

#: The longest wait for the staging table's rows while checksumming them (seconds).
CHECKSUM_TIMEOUT = 300.0


class PublishError(Exception):
    """What was staged does not add up, or a merge key is NULL or repeated: no retry fixes
    it; the destination is unchanged."""

    permanent = True


@dataclass(frozen=True)
class RangeLedger:
    """Where the ranges' loads recorded themselves: the mapped load task and lineage."""

    dag_id: str
    task_id: str
    run_id: str
    lineage: str
    parts: int
    #: The ledger's schema (``ledger_schema``); None: the destination table's.
    schema: str | None = None

    def schema_for(self, target: Target) -> str:
        return self.schema or target.schema


@dataclass(frozen=True)
class Published:
    rows: int
    bytes: int
    inserted: int | None = None
    updated: int | None = None
    already: bool = False
    try_number: int | None = None
    #: The table's OID (publish may have created it).
    oid: int | None = None


def publish(
    conn: psycopg.Connection[Any], spec: load.Destination, target: Target, ledger: load.Ledger,
    ranges: RangeLedger, *, source_columns: list[str], lock_timeout: float,
    verify: str = "count", render_settings: dict[str, str] | None = None,
    timeout: float = CHECKSUM_TIMEOUT,
) -> Published:
    """Publish ``target``'s staged rows into its table, once per lineage (``ledger``).
    ``source_columns``: the source table's columns (those the ranges filled, matched by
    name; the table's other columns keep their defaults or, in a merge, their values).
    ``verify="checksum"``: the staging table's checksum must equal the sum of the ranges'
    (their ledger rows'), else :class:`PublishError`; ``render_settings``: the source's
    (:func:`load.render_settings`) where the ranges' COPY was text or CSV; ``timeout``: the
    longest wait for the staging table's rows while checksumming."""
    schema = ledger.schema or target.schema
    ledger.ensure_table(conn, schema)
    try:
        _set_lock_timeout(conn, lock_timeout)
        ledger.claim(conn, spec.conn_id, target.key)
        entry = ledger.read(conn, schema, spec.conn_id, target.key)
        if entry is not None:
            conn.rollback()
            _drop_staging(conn, target)  # a cleared load may have made it again, empty
            return Published(entry.rows, entry.bytes, entry.inserted, entry.updated,
                             already=True, try_number=entry.try_number)
        # A replace or append counts the staged rows as it inserts them (one scan less).
        counted_by_insert = spec.mode != "merge"
        rows, nbytes = _check_staged(conn, spec, target, ranges, count=not counted_by_insert)
        if verify == "checksum":
            columns = list(spec.columns) if spec.columns else source_columns
            _check_checksum(conn, spec, target, ranges, columns, render_settings, timeout)
        # One load of the table at a time: the same lock every CopyMan load of it takes.
        load.take_load_lock(conn, target.key, lock_timeout, new_table=(
            None if target.oid is not None else (target.schema, target.name)))
        target = _created(conn, spec, target)
        for statement in spec.statements:
            conn.execute(statement)  # type: ignore[call-overload]
        inserted, updated = _apply(conn, spec, target, source_columns, lock_timeout)
        if counted_by_insert:
            _check_inserted(spec, target, inserted, rows)
            inserted = None  # reported for a merge only
        for statement in spec.post_statements:
            conn.execute(statement)  # type: ignore[call-overload]
        recorded = ledger.record(
            conn, schema, spec.conn_id, target.key, rows, nbytes,
            load.Extras(inserted=inserted, updated=updated),
        )
        if not recorded:  # another try of this lineage published first
            conn.rollback()
            entry = ledger.lookup(conn, schema, spec.conn_id, target.key)
            assert entry is not None
            return Published(entry.rows, entry.bytes, entry.inserted, entry.updated,
                             already=True, try_number=entry.try_number)
        conn.execute(sql.SQL("DROP TABLE {}").format(target.staging_id))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return Published(rows, nbytes, inserted, updated, oid=target.oid)


def _created(conn: psycopg.Connection[Any], spec: load.Destination, target: Target) -> Target:
    """``create="if_missing"``: the table, made in the publish transaction (from the staging
    table's columns) unless it exists now; with its OID. Under the load lock, so two
    publishes never both create it."""
    if target.oid is None:
        # Read from pg_class itself: a name lookup may answer from this session's catalog
        # cache, which the advisory lock does not refresh, and miss a table just committed.
        oid = _oid(conn, target)
        if oid is None:
            conn.execute(create_like_staging(
                target, spec.key if spec.mode == "merge" else None, spec.key_nulls == "match"
            ))
            oid = _oid(conn, target)
        assert oid is not None
        target = replace(target, oid=oid)
    return target


def _oid(conn: psycopg.Connection[Any], target: Target) -> int | None:
    row = conn.execute(
        "SELECT c.oid::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s", [target.schema, target.name],
    ).fetchone()
    return int(row[0]) if row else None


def _drop_staging(conn: psycopg.Connection[Any], target: Target) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target.staging_id))
    conn.commit()


def _check_staged(
    conn: psycopg.Connection[Any], spec: load.Destination, target: Target, ranges: RangeLedger,
    *, count: bool = True,
) -> tuple[int, int]:
    """The rows and bytes the ranges' ledger rows report, after checking that every range
    has one and (``count``) that the staging table holds exactly those rows."""
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [target.staging_text]).fetchone()
    if not exists or not exists[0]:
        raise PublishError(
            f"{spec.label}: staging table {target.staging_key} is missing (dropped by hand?): "
            "the destination was left unchanged"
        )
    loaded = _adapters.range_ledger_rows(
        conn, ranges.schema_for(target), dag_id=ranges.dag_id, task_id=ranges.task_id,
        run_id=ranges.run_id, lineage=ranges.lineage, conn_id=spec.conn_id,
        destination=target.staging_key,
    )
    if len(loaded) != ranges.parts:
        raise PublishError(
            f"{spec.label}: {len(loaded)} of {ranges.parts} ranges are recorded as staged in "
            f"{target.staging_key}: the destination was left unchanged"
        )
    reported = sum(r for _, r, _ in loaded)
    if not count:
        return reported, sum(b for _, _, b in loaded)
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target.staging_id)).fetchone()
    staged = int(row[0]) if row else 0
    if staged != reported:
        raise PublishError(
            f"{spec.label}: staging table {target.staging_key} holds {staged} rows, the ranges "
            f"reported {reported}: the destination was left unchanged"
        )
    return staged, sum(b for _, _, b in loaded)


def _check_checksum(
    conn: psycopg.Connection[Any], spec: load.Destination, target: Target, ranges: RangeLedger,
    columns: list[str], render_settings: dict[str, str] | None, timeout: float,
) -> None:
    """The staging table's checksum, taken as the ranges' were, equals their sum."""
    recorded = load.ledger_checksums(
        conn, ranges.schema_for(target), dag_id=ranges.dag_id, task_id=ranges.task_id,
        run_id=ranges.run_id, lineage=ranges.lineage, conn_id=spec.conn_id,
        destination=target.staging_key,
    )
    missing = [m for m, text in recorded if text is None]
    if missing or not recorded:
        raise PublishError(
            f"{spec.label}: verify='checksum', but range(s) {missing or 'all'} recorded no "
            f"checksum in the ledger for {target.staging_key} (loaded without "
            "verify='checksum'?): the destination was left unchanged"
        )
    expected = load.sum_checksums([load.parse_checksum(t) for _, t in recorded if t])
    staged = load.relation_checksum(
        conn, target.staging_id, columns, expected.method, settings=render_settings,
        timeout=timeout,
    )
    if staged != expected:
        raise PublishError(
            f"{spec.label}: the checksum of staging table {target.staging_key} ({staged}) "
            f"differs from the sum of its {len(recorded)} ranges' ({expected}): the staged "
            "rows were changed after their ranges loaded: the destination was left unchanged"
        )


def _columns(
    conn: psycopg.Connection[Any], spec: load.Destination, target: Target, source: list[str]
) -> list[str]:
    """The columns to publish: those given, else the table's columns the source has (by
    name) and the table lets one write (not generated)."""
    if spec.columns:
        return list(spec.columns)
    found = conn.execute(
        "SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0"
        " AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
        [target.oid],
    ).fetchall()
    return [r[0] for r in found if r[0] in source]


def _apply(
    conn: psycopg.Connection[Any], spec: load.Destination, target: Target, source: list[str],
    lock_timeout: float,
) -> tuple[int | None, int | None]:
    columns = _columns(conn, spec, target, source)
    if spec.mode == "merge":
        return _merge(conn, spec, target, columns)
    if spec.mode == "replace":
        if spec.replace_with == "delete":
            conn.execute(load.mode_sql.delete_all(target.table_id, only=False))
        else:
            _truncate(conn, target, spec.cascade, lock_timeout)
    names = load.mode_sql.names(columns)
    written = conn.execute(
        sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {}").format(
            target.table_id, names, names, target.staging_id
        )
    ).rowcount
    return written, None


def _check_inserted(spec: load.Destination, target: Target, written: int | None,
                    reported: int) -> None:
    """The rows a replace or append inserted from the staging table are the ranges'."""
    if written != reported:
        raise PublishError(
            f"{spec.label}: staging table {target.staging_key} holds {written} rows, the "
            f"ranges reported {reported}: the destination was left unchanged"
        )


#: TRUNCATE's ACCESS EXCLUSIVE lock is asked for in tries this long: while one try waits
#: behind a long reader, every new reader queues behind it; between tries they go on.
TRUNCATE_TRY = 0.5


def _truncate(
    conn: psycopg.Connection[Any], target: Target, cascade: bool, lock_timeout: float
) -> None:
    """TRUNCATE in tries of :data:`TRUNCATE_TRY` (each in a savepoint) until
    ``lock_timeout`` is spent; then the last try's LockNotAvailable (transient)."""
    statement = load.mode_sql.truncate(target.table_id, only=False, cascade=cascade)
    deadline = time.monotonic() + lock_timeout
    while True:
        try_for = max(0.01, min(TRUNCATE_TRY, deadline - time.monotonic()))
        try:
            with conn.transaction():
                _set_lock_timeout(conn, try_for)
                conn.execute(statement)
            break
        except psycopg.errors.LockNotAvailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
    _set_lock_timeout(conn, lock_timeout)


def _merge(
    conn: psycopg.Connection[Any], spec: load.Destination, target: Target, columns: list[str]
) -> tuple[int, int]:
    """The load layer's merge (its statements, :data:`load.mode_sql`) from the staging
    table: NULL keys refused unless ``key_nulls="match"``, a repeated key refused, rows
    whose values differ updated (rows equal to the staged ones are not rewritten), the
    others inserted."""
    key = list(spec.key or ())
    nulls_match = spec.key_nulls == "match"
    stage = target.staging_id
    mode_sql = load.mode_sql
    if not nulls_match:
        counts = conn.execute(mode_sql.null_key_count(key, stage)).fetchone()
        assert counts is not None
        if counts[0]:
            per_key = ", ".join(f"{k}: {n}" for k, n in zip(key, counts[1:], strict=True) if n)
            raise PublishError(
                f"{spec.label}: {counts[0]} staged row(s) have a NULL in the merge key "
                f"({per_key}); a NULL key matches no row (key_nulls='match' matches them as "
                "equal): the destination was left unchanged"
            )
    try:
        conn.execute(mode_sql.unique_key_index(key, nulls_match=nulls_match, stage=stage))
    except psycopg.errors.UniqueViolation as exc:
        duplicate = (exc.diag.message_detail or "").strip().rstrip(".")
        raise PublishError(
            f"{spec.label}: the merge key ({', '.join(key)}) occurs more than once in the "
            f"source ({duplicate or 'a key is duplicated'}): the destination was left "
            "unchanged"
        ) from None
    key_indexes = load.merge_key_indexes(conn, target.key, key)
    update = mode_sql.update_changed(
        target.table_id, columns, key, load.merge_send_functions(conn, target.key),
        nulls_match=nulls_match, stage=stage,
    )
    try:
        updated = 0 if update is None else conn.execute(update).rowcount
        inserted = conn.execute(mode_sql.insert_missing(
            target.table_id, columns, key, nulls_match=nulls_match, stage=stage
        )).rowcount
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name not in key_indexes:
            raise  # another unique column: the source's own value, permanent
        raise load.MergeConflictError(
            f"{spec.label}: a writer outside CopyMan inserted a key this merge was inserting, "
            "after the merge looked for it: the destination was left unchanged; a retry "
            "merges it"
        ) from exc
    return inserted, updated


def staged_rows(
    conn: psycopg.Connection[Any], target: Target, ranges: RangeLedger, conn_id: str
) -> int:
    """The rows the ranges report as staged into ``target`` (their ledger rows). Ends the
    transaction it opens."""
    try:
        loaded = _adapters.range_ledger_rows(
            conn, ranges.schema_for(target), dag_id=ranges.dag_id, task_id=ranges.task_id,
            run_id=ranges.run_id, lineage=ranges.lineage, conn_id=conn_id,
            destination=target.staging_key,
        )
    finally:
        conn.rollback()
    return sum(r for _, r, _ in loaded)


def landed(
    conn: psycopg.Connection[Any], spec: load.Destination, target: Target, ranges: RangeLedger
) -> Published:
    """Without staging (append, ``stage=False``): every range loaded straight into the
    table; checks that the ledger holds a row for each, and sums them. Changes nothing.
    Ends the transaction it opens."""
    try:
        loaded = _adapters.range_ledger_rows(
            conn, ranges.schema_for(target), dag_id=ranges.dag_id, task_id=ranges.task_id,
            run_id=ranges.run_id, lineage=ranges.lineage, conn_id=spec.conn_id,
            destination=target.key,
        )
    finally:
        conn.rollback()
    if len(loaded) != ranges.parts:
        raise PublishError(
            f"{spec.label}: {len(loaded)} of {ranges.parts} ranges are recorded as loaded into "
            f"{target.key}"
        )
    return Published(sum(r for _, r, _ in loaded), sum(b for _, _, b in loaded))
