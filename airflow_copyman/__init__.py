"""airflow-copyman: stream PostgreSQL COPY data from one source into many destinations.

``airflow_copyman.copyman`` is the engine and imports no Airflow module; the Airflow
provider lives in ``airflow_copyman.hooks`` and ``airflow_copyman.operators``.
"""

__version__ = "0.1.0"
