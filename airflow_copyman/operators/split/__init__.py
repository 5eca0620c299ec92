"""CopyManSplitGroup: one big table in key ranges, loaded by a mapped task, published at
once into every destination.

Tasks (inside the group): ``plan`` (the ranges, frozen for the DAG run in its
``task_state_store``), ``load`` (mapped: one instance a range, each into a staging table
per destination, exactly once through the ledger keyed by its map index) and ``publish``
(per destination, one transaction: check, apply the mode, ledger row, drop the staging
table; then drop the staging tables of this group's earlier failed runs). The work itself
is in :mod:`airflow_copyman.split` (no Airflow there).
"""

from airflow_copyman.operators.split.group import PLAN_KEY, CopyManSplitGroup, check_arguments

__all__ = ["PLAN_KEY", "CopyManSplitGroup", "check_arguments"]
