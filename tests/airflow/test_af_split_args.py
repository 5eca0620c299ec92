"""CopyManSplitGroup's arguments (issue 18): what the DAG file's parse refuses, and the
tasks the group holds."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from airflow_copyman.operators.copyman import CopyManSplitGroup

DESTS = [{"conn_id": "d", "table": "public.t", "mode": "replace"}]


def group(**kwargs: Any) -> CopyManSplitGroup:
    from airflow.sdk import DAG

    options: dict[str, Any] = {"source_conn_id": "s", "table": "public.t", "destinations": DESTS}
    options.update(kwargs)
    with DAG("split_args", schedule=None, start_date=datetime.datetime(2024, 1, 1)):
        return CopyManSplitGroup("g", **options)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parts": 0}, "parts must be a whole number from 1 to 1024"),
        ({"parts": 1025}, "parts must be a whole number from 1 to 1024"),
        ({"parts": "4"}, "parts must be"),
        ({"table": "SELECT * FROM t"}, "table must be a table name .*not a query"),
        ({"table": "t WHERE x > 1"}, "table must be a table name"),
        ({"split_by": ""}, "split_by must be the name of"),
        ({"split_by": "ctid"}, "split_by must be the name of"),
        ({"split_by": 3}, "split_by must be the name of"),
        ({"max_active_parts": 0}, "max_active_parts must be"),
        ({"where": ["x"]}, "where must be SQL text"),
        ({"destinations": []}, "destinations is empty"),
        ({"stage": False, "destinations": [{"conn_id": "d", "table": "t",
                                            "create": "if_missing"}]},
         "stage: d:t: .*into a table that exists"),
        ({"destinations": [{"conn_id": "d"}]}, "table"),
        ({"stage": False}, "stage: d:public.t: stage=False .* only for mode='append'"),
        ({"stage": False, "destinations": [{"conn_id": "d", "table": "t",
                                            "postoperator": "SELECT 1"}]}, "stage: d:t"),
        ({"stage": "no"}, "stage must be true or false"),
    ],
)
def test_bad_arguments_are_refused_when_the_dag_is_parsed(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^g: .*{message}"):
        group(**kwargs)


def test_the_group_holds_plan_a_mapped_load_and_publish() -> None:
    g = group(parts=16, max_active_parts=4, retries=3, table="{{ params.t }}",
              tooltip="events")
    assert g.plan.task_id == "g.plan" and g.publish.task_id == "g.publish"
    assert g.load.task_id == "g.load" and g.load.max_active_tis_per_dagrun == 4
    assert g.publish.retries == 3 and g.tooltip == "events"
    assert g.publish.upstream_task_ids == {"g.load"}


def test_a_static_asset_outlet_goes_to_publish_alone() -> None:
    """The tables change when publish commits: a destination declared as an Asset outlet
    (Airflow creates it when it parses the DAG) gets its event from publish, never from the
    plan or from each range."""
    from airflow.sdk import Asset

    table = Asset("postgres://wh:5432/warehouse/public/t")
    g = group(outlets=[table])
    assert table in g.publish.outlets
    assert table not in g.plan.outlets
    assert table not in (g.load.partial_kwargs.get("outlets") or [])


def test_openlineage_facets_of_publish() -> None:
    """The source table in, each destination out with the rows published (where the
    OpenLineage provider is installed), as CopyManOperator's."""
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_copyman import load

    g = group(table="sales.events")
    publish: Any = g.publish
    publish._report = load.TransferReport(
        9, 90, None, 0.0, [load.DestinationResult("d", "public.t", "loaded", 9, 90)],
        {"s": ("postgres://src.example:5432", "shop"), "d": ("postgres://wh.example:5432", "dwh")},
    )
    done = publish.get_openlineage_facets_on_complete(None)
    assert [d.name for d in done.inputs] == ["shop.sales.events"]
    (output,) = done.outputs
    assert output.name == "dwh.public.t"
    assert output.outputFacets["outputStatistics"].rowCount == 9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parallel": 0}, "parallel must be 1..1024, got 0"),
        ({"parallel": "2"}, "parallel must be an int, got str"),
        ({"parallel": 2, "sql": "SELECT * FROM t"}, "sql must name a table, not a query"),
        ({"parallel": 2, "ledger": False}, "parallel=2 needs ledger=True"),
    ],
)
def test_copyman_operator_parallel_refused_at_parse(kwargs: dict[str, Any], message: str) -> None:
    from airflow.sdk import DAG

    from airflow_copyman.operators.copyman import CopyManOperator

    options: dict[str, Any] = {"source_conn_id": "s", "sql": "public.t", "destinations": DESTS}
    options.update(kwargs)
    with DAG("parallel_args", schedule=None, start_date=datetime.datetime(2024, 1, 1)):
        with pytest.raises(ValueError, match=message):
            CopyManOperator(task_id="copy", **options)
