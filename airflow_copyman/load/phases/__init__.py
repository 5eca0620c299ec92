"""The phases of one load: connect, ledger, plan, copy, commit, report (internal to the load
layer; :class:`airflow_copyman.load.Transfer` runs them)."""
