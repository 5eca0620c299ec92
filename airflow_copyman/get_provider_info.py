"""Provider metadata, read by Airflow's ``ProvidersManager`` through the
``apache_airflow_provider`` entry point (see ``pyproject.toml``).

The hook reuses the ``postgres`` connection type of ``apache-airflow-providers-postgres``
(connections are plain PostgreSQL connections), so this file declares no
``connection-types`` of its own: declaring ``postgres`` a second time would make Airflow
warn that the type is already registered by another class, and a new type would make
users create special connections for what is just PostgreSQL.
"""

from __future__ import annotations

from typing import Any

PACKAGE_NAME = "airflow-copyman"
INTEGRATION = "CopyMan (PostgreSQL COPY fan-out)"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": PACKAGE_NAME,
        "name": "CopyMan",
        "description": (
            "Stream PostgreSQL ``COPY`` data from one source into many destinations in one "
            "pass (CopyManHook, CopyManOperator); a failed destination is retried alone."
        ),
        "integrations": [
            {
                "integration-name": INTEGRATION,
                "external-doc-url": "https://www.postgresql.org/docs/current/sql-copy.html",
                "tags": ["software"],
            }
        ],
        "hooks": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["airflow_copyman.hooks.copyman"],
            }
        ],
        "operators": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["airflow_copyman.operators.copyman"],
            }
        ],
    }
