"""The loads of :mod:`airflow_copyman.load` as Dagster assets (``pip install
'airflow-copyman[dagster]'``): a resource, a load, a decorator and a translator, as
``dagster-dlt`` and ``dagster-sling`` have. Imports no Airflow.

See the README, section "Dagster", and ``example_dags/dagster_copyman.py``.
"""

from __future__ import annotations

from airflow_copyman.dagster._assets import CHECK_NAME, copyman_assets
from airflow_copyman.dagster._load import CopyManLoad
from airflow_copyman.dagster._resource import (
    CopyManDestinationsFailed,
    CopyManResource,
    task_key,
)
from airflow_copyman.dagster._translator import CopyManDestinationData, CopyManTranslator

__all__ = [
    "CHECK_NAME",
    "CopyManDestinationData",
    "CopyManDestinationsFailed",
    "CopyManLoad",
    "CopyManResource",
    "CopyManTranslator",
    "copyman_assets",
    "task_key",
]
