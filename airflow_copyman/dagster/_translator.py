"""How a destination becomes an asset: :class:`CopyManTranslator` (subclass it to change keys,
groups, owners, tags), as ``DagsterDltTranslator`` / ``DagsterSlingTranslator`` do."""

from __future__ import annotations

import re
from dataclasses import dataclass

import dagster as dg

from airflow_copyman.dagster._load import CopyManLoad, table_parts
from airflow_copyman.load import ConfigError, Destination


@dataclass(frozen=True)
class CopyManDestinationData:
    """What the translator knows of one destination when the code location loads."""

    load: CopyManLoad
    destination: Destination
    #: The destination table as its asset key names it (unqualified: ``public``).
    schema: str
    table: str


class CopyManTranslator:
    """The asset spec of each destination: by default keyed ``[connection, schema, table]``,
    kind ``postgres``, with the source table (where ``sql`` names one) as its dependency."""

    def get_asset_spec(self, data: CopyManDestinationData) -> dg.AssetSpec:
        destination = data.destination
        deps = [self.get_source_asset_key(data.load)] if data.load.source_table else []
        return dg.AssetSpec(
            key=asset_key(destination.conn_id, data.schema, data.table),
            deps=[d for d in deps if d is not None],
            description=f"{data.load.source} -> {destination.conn_id}:{destination.table} "
            f"({destination.mode})",
            kinds={"postgres"},
            metadata={
                "copyman/connection": destination.conn_id,
                "copyman/table": destination.table,
                "copyman/mode": destination.mode,
            },
        )

    def get_source_asset_key(self, spec: CopyManLoad) -> dg.AssetKey | None:
        """The source table's key, ``[source connection, schema, table]``, or None where
        ``sql`` is a query."""
        parts = spec.source_table
        return None if parts is None else asset_key(spec.source, *parts)


def asset_key(*parts: str) -> dg.AssetKey:
    """A key of these names, each character Dagster refuses in a name (``^[A-Za-z0-9_]+$``:
    it names inputs and outputs after keys) replaced by ``_``."""
    return dg.AssetKey([re.sub(r"[^A-Za-z0-9_]", "_", part) for part in parts])


def destination_data(spec: CopyManLoad, destination: Destination) -> CopyManDestinationData:
    parts = table_parts(destination.table)
    if parts is None:  # Destination.from_value accepted it, so it is a table name
        raise ConfigError(f"{destination.label}: not a table name")
    return CopyManDestinationData(spec, destination, *parts)
