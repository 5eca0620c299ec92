"""``python -m airflow_copyman.cli``: the ``copyman`` command."""

import sys

from airflow_copyman.cli.main import main

sys.exit(main())
