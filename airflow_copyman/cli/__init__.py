"""``copyman``: the command line of the load layer, for one-off copies, cron jobs and other
schedulers, without Airflow.

It builds endpoints, destinations and one :class:`~airflow_copyman.load.LoadOptions` from
its arguments (or a TOML load file) and runs the load through the public names of
:mod:`airflow_copyman.load` only. What it prints: the report (``--json``) on stdout, the
rest on stderr; its exit status says whether a retry may help (:mod:`.exits`).
"""

from airflow_copyman.cli.main import main

__all__ = ["main"]
