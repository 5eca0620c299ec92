"""``mode="append"``: COPY into the table; the rows already there stay."""

from __future__ import annotations

from airflow_copyman.load.modes.base import Mode


class Append(Mode):
    """Today's behaviour: the COPY adds the source's rows."""

    name = "append"
