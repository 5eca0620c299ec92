"""Each destination table an Airflow asset: the task's outlets, and one event per load.

Destinations are templated and their connections are resolved while the task runs, so the
operator declares an asset *alias* (:func:`alias_name`) as its outlet, and each successful
try adds one event per destination to it, on the asset whose URI is the postgres
provider's (``postgres://host:port/database/schema/table``), with the load's metrics as the
event's extra. A DAG scheduled on that asset runs once the table is loaded, and reads the
metrics from its triggering (or inlet) events, without XCom.

Exactly once per load: Airflow records a task's outlet events only when the task succeeds,
so a try where any destination failed emits none, not even for the destinations it
committed. The try that succeeds later announces those (the ledger skips them as
``already_loaded``) together with its own loads. A load that an earlier successful try
announced is not announced again (a cleared task with ``resume_on_clear``): the task's
``task_state_store`` keeps which loads (destination, loading try) were announced.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import Asset, AssetAlias, BaseHook

from airflow_copyman._destinations import Destination, DestinationResult, TransferReport
from airflow_copyman.load import Relation

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator

__all__ = ["ALIAS_PREFIX", "ASSETS_STATE_KEY", "alias_name", "asset_uri", "declare", "emit"]

log = logging.getLogger(__name__)

#: The alias of a task is ``copyman:<dag_id>:<task_id>`` (``:`` never occurs in either id).
ALIAS_PREFIX = "copyman:"
#: The ``task_state_store`` key listing the loads already announced.
ASSETS_STATE_KEY = "copyman_assets"
#: What a destination's result may carry beyond rows and bytes (modes add them).
_OPTIONAL_METRICS = ("inserted", "updated", "checksum")


def alias_name(dag_id: str, task_id: str) -> str:
    """The asset alias a CopyMan task emits its events through."""
    return f"{ALIAS_PREFIX}{dag_id}:{task_id}"


def declare(operator: BaseOperator) -> AssetAlias | None:
    """Add the task's alias to its outlets unless they hold an alias already (the user's,
    which then gets the events). Returns the alias used; None while the operator belongs
    to no DAG (it is declared again when the task runs)."""
    for outlet in operator.outlets:
        if isinstance(outlet, AssetAlias):
            return outlet
    if operator.get_dag() is None:
        return None
    alias = AssetAlias(alias_name(operator.dag_id, operator.task_id))
    operator.outlets.append(alias)
    return alias


def asset_uri(host: str | None, port: int | None, relation: Relation) -> str:
    """The postgres provider's asset URI of a table (never a login or password).

    Names are percent-encoded (a ``/`` in a table name must not make a fifth path part);
    ordinary names (letters, digits, ``_``) read as they are. No host is the local socket.
    """
    host = host or "localhost"
    netloc = f"[{host}]" if ":" in host else quote(host, safe="")
    path = "/".join(quote(p, safe="") for p in (relation.database, relation.schema, relation.name))
    return f"postgres://{netloc}:{port or 5432}/{path}"


def extra_of(spec: Destination, result: DestinationResult, loaded_by: int | None) -> dict[str, Any]:
    """The event's extra: the load's metrics, as the destination's result has them."""
    values = result.as_dict()
    # The destination's mode (``truncate=True`` is ``mode="replace"`` there already).
    extra: dict[str, Any] = {"rows": result.rows, "bytes": result.bytes, "mode": spec.mode}
    for key in _OPTIONAL_METRICS:
        value = values.get(key, getattr(result, key, None))
        if value is not None:
            extra[key] = value
    extra["conn_id"] = spec.conn_id
    extra["try_number"] = loaded_by
    return extra


def emit(
    context: Mapping[str, Any],
    operator: BaseOperator,
    specs: Sequence[Destination],
    report: TransferReport,
    try_number: int,
) -> list[tuple[str, dict[str, Any]]]:
    """Add one asset event per destination loaded and not yet announced; returns them as
    (URI, extra). Call it once the try is about to succeed."""
    outlet_events = context.get("outlet_events")
    if outlet_events is None:  # execute() outside a task run
        return []
    alias = declare(operator)
    static = {o.uri: o for o in operator.outlets if isinstance(o, Asset)}
    store = context.get("task_state_store")
    announced = _announced(store)
    hosts: dict[str, tuple[str | None, int | None]] = {}
    emitted: list[tuple[str, dict[str, Any]]] = []
    for spec, result in zip(specs, report.destinations, strict=True):
        if result.status not in ("loaded", "already_loaded"):
            continue  # a failed destination emits nothing
        loaded_by = result.try_number
        if loaded_by is None and result.status == "loaded":
            loaded_by = try_number
        if loaded_by is not None and announced.get(result.label) == loaded_by:
            log.info("%s: its load by try %d was announced already", result.label, loaded_by)
            continue
        if result.relation is None:
            log.warning("%s: the table could not be named: no asset event", result.label)
            continue
        try:
            if spec.conn_id not in hosts:
                conn = BaseHook.get_connection(spec.conn_id)
                hosts[spec.conn_id] = (conn.host, conn.port)
            asset = Asset(asset_uri(*hosts[spec.conn_id], result.relation))
        except Exception as exc:
            # The data is committed: a name that cannot be had fails no task. The load is
            # not recorded as announced: a cleared task's next successful try announces it.
            log.warning("%s: no asset event: %s", result.label, type(exc).__name__)
            continue
        extra = extra_of(spec, result, loaded_by)
        if asset.uri in static:
            # Declared as a static outlet: Airflow emits its event; give it the metrics.
            outlet_events[static[asset.uri]].extra.update(extra)
        elif alias is not None:
            outlet_events[alias].add(asset, extra=extra)
        else:  # pragma: no cover - declare() always finds or adds one at run time
            continue
        log.info("Asset event %s: %s", asset.uri, extra)
        emitted.append((asset.uri, extra))
        if loaded_by is not None:
            announced[result.label] = loaded_by
    if emitted and store is not None:
        try:
            store.set(ASSETS_STATE_KEY, {"announced": announced})
        except Exception as exc:  # the events go out anyway; a later clear may repeat them
            log.warning("Could not record the announced loads in task_state_store: %s", exc)
    return emitted


def _announced(store: Any) -> dict[str, int]:
    record = store.get(ASSETS_STATE_KEY) if store is not None else None
    if not isinstance(record, dict) or not isinstance(record.get("announced"), dict):
        return {}
    return {k: v for k, v in record["announced"].items() if isinstance(v, int)}
