"""The loads as Dagster assets (issue 19), in process (``dg.materialize``) against real
servers: metadata and checks against the tables, a subset, failures, retries, partitions."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import dagster as dg
import pytest
from dagster._serdes import serialize_value

from airflow_copyman.dagster import (
    CopyManDestinationData,
    CopyManLoad,
    CopyManResource,
    CopyManTranslator,
    copyman_assets,
)
from airflow_copyman.load import ConfigError
from tests.dagster.conftest import DAYS, PER_DAY, Warehouse

WH1 = dg.AssetKey(["wh1", "public", "orders"])
WH2 = dg.AssetKey(["wh2", "analytics", "orders"])
DAY = "2024-01-02"


def materialize(
    example: ModuleType, warehouse: Warehouse, *, day: str = DAY, min_amount: int = 0,
    selection: list[dg.AssetKey] | None = None, instance: dg.DagsterInstance | None = None,
    **resource: Any,
) -> dg.ExecuteInJobResult:
    return dg.materialize(
        [example.orders_assets],
        partition_key=day,
        selection=selection,
        instance=instance,
        resources={"copyman": CopyManResource(connections=warehouse.connections(), **resource)},
        run_config={"ops": {"orders_assets": {"config": {"min_amount": min_amount}}}},
        raise_on_error=False,
    )


def materializations(result: dg.ExecuteInJobResult) -> dict[dg.AssetKey, dict[str, Any]]:
    return {
        m.asset_key: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node("orders_assets")
    }


def checks(result: dg.ExecuteInJobResult) -> dict[dg.AssetKey, Any]:
    return {e.asset_key: e for e in result.get_asset_check_evaluations()}


def events_text(result: dg.ExecuteInJobResult) -> str:
    """Every event of the run."""
    return "\n".join(
        serialize_value(e.event_specific_data) + (e.message or "") for e in result.all_events
    )


def stored_text(instance: dg.DagsterInstance, result: dg.ExecuteInJobResult) -> str:
    """Everything the instance stored of the run: its events and log lines, its config."""
    run = instance.get_run_by_id(result.run_id)
    return serialize_value(run) + "\n".join(
        serialize_value(e) for e in instance.all_logs(result.run_id)
    )


def retries(result: dg.ExecuteInJobResult) -> int:
    return sum(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)


def test_metadata_and_checks_match_the_tables(example: ModuleType, warehouse: Warehouse) -> None:
    warehouse.wh1.execute("INSERT INTO orders VALUES (2050, '2024-01-02', 50, 'old')")
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(example, warehouse, min_amount=11, instance=instance)
    assert result.success
    wanted = [r for r in warehouse.source_rows(DAY) if r[2] >= 11]
    assert warehouse.day_rows(warehouse.wh1, "orders", DAY) == wanted  # run config reached it
    assert warehouse.day_rows(warehouse.wh2, "analytics.orders", DAY) == wanted
    found = materializations(result)
    assert set(found) == {WH1, WH2}
    merged, replaced = found[WH1], found[WH2]
    assert merged["dagster/row_count"] == replaced["dagster/row_count"] == len(wanted) == 40
    assert (merged["copyman/mode"], replaced["copyman/mode"]) == ("merge", "replace")
    assert (merged["copyman/inserted"], merged["copyman/updated"]) == (39, 1)  # 2050 was there
    assert "copyman/inserted" not in replaced
    assert merged["copyman/format"] == "binary" and merged["copyman/bytes"] > 0
    assert merged["copyman/checksum"] == replaced["copyman/checksum"]
    assert merged["copyman/checksum"].startswith("40:")
    assert merged["copyman/duration_seconds"] >= 0
    assert replaced["dagster/table_name"].endswith(".analytics.orders")
    columns = merged["dagster/column_schema"].columns
    assert [(c.name, c.type, c.constraints.nullable) for c in columns] == [
        ("id", "integer", False), ("day", "date", False), ("amount", "integer", False),
        ("note", "text", True),
    ]
    verified = checks(result)
    assert set(verified) == {WH1, WH2}
    for evaluation in verified.values():
        assert evaluation.passed
        values = {k: v.value for k, v in evaluation.metadata.items()}
        assert values["source_rows"] == values["destination_rows"] == 40
        assert values["source_checksum"] == values["destination_checksum"] == \
            merged["copyman/checksum"]
    stored = stored_text(instance, result)
    assert "committed 40 rows" in stored  # the load's log lines are in it
    assert warehouse.password not in stored


def test_a_subset_loads_only_its_destination(example: ModuleType, warehouse: Warehouse) -> None:
    result = materialize(example, warehouse, selection=[WH2])
    assert result.success
    assert set(materializations(result)) == {WH2} and set(checks(result)) == {WH2}
    assert len(warehouse.day_rows(warehouse.wh2, "analytics.orders", DAY)) == PER_DAY
    assert warehouse.wh1.scalar("SELECT count(*) FROM orders") == 0


def test_a_transient_failure_is_retried_once_and_loads_only_what_failed(
    example: ModuleType, warehouse: Warehouse
) -> None:
    # wh2 fails its first load only, with a serialization failure (transient): the sequence
    # counts the loads and is not rolled back with them.
    warehouse.wh2.execute(
        "CREATE SEQUENCE loads; CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN IF nextval('loads') = 1 THEN RAISE EXCEPTION 'first load fails' USING "
        "ERRCODE = '40001'; END IF; RETURN NULL; END$$; CREATE TRIGGER fail_once BEFORE INSERT "
        "ON analytics.orders FOR EACH STATEMENT EXECUTE FUNCTION fail_once()"
    )
    result = materialize(example, warehouse)
    assert result.success
    assert retries(result) == 1
    assert warehouse.wh2.scalar("SELECT last_value FROM loads") == 2
    wanted = warehouse.source_rows(DAY)
    assert warehouse.day_rows(warehouse.wh1, "orders", DAY) == wanted
    assert warehouse.day_rows(warehouse.wh2, "analytics.orders", DAY) == wanted
    # wh1 was loaded by the first try, which the retry skipped; wh2 by the retry.
    assert warehouse.wh1.execute("SELECT try_number, run_id, lineage FROM copyman_ledger") == [
        (1, f"{result.run_id}:{DAY}", result.run_id)
    ]
    assert warehouse.wh2.scalar("SELECT try_number FROM analytics.copyman_ledger") == 2
    statuses = [
        (m.asset_key, m.metadata["copyman/status"].value)
        for m in result.asset_materializations_for_node("orders_assets")
    ]
    assert sorted(statuses) == sorted(
        [(WH1, "loaded"), (WH1, "already_loaded"), (WH2, "loaded")]
    )
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY")
    assert "wh2:analytics.orders" in (failure.message or "") + serialize_value(
        failure.event_specific_data
    )


def test_a_checksum_mismatch_fails_its_check_and_is_not_retried(
    example: ModuleType, warehouse: Warehouse
) -> None:
    # wh2 changes the rows it is sent: permanent, and its check says so with both checksums.
    warehouse.wh2.execute(
        "CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
        "NEW.amount = NEW.amount + 1; RETURN NEW; END$$; CREATE TRIGGER bump BEFORE INSERT "
        "ON analytics.orders FOR EACH ROW EXECUTE FUNCTION bump()"
    )
    result = materialize(example, warehouse)
    assert not result.success
    assert retries(result) == 0
    assert set(materializations(result)) == {WH1}  # the other destination committed
    assert warehouse.wh2.scalar("SELECT count(*) FROM analytics.orders") == 0
    verified = checks(result)
    assert verified[WH1].passed and not verified[WH2].passed
    values = {k: v.value for k, v in verified[WH2].metadata.items()}
    assert values["source_checksum"] != values["destination_checksum"]
    assert values["source_checksum"].startswith(f"{PER_DAY}:")  # rows:method:sum
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    text = serialize_value(failure.event_specific_data)
    assert "wh2:analytics.orders" in text and "checksum" in text and "no retry" in text


def test_bad_input_fails_before_anything_moves(example: ModuleType, warehouse: Warehouse) -> None:
    warehouse.wh2.execute("DROP TABLE analytics.orders")
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(example, warehouse, instance=instance)
    assert not result.success and retries(result) == 0
    assert materializations(result) == {}
    assert warehouse.wh1.scalar("SELECT count(*) FROM orders") == 0
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    text = serialize_value(failure.event_specific_data)
    assert "nothing was loaded" in text and "analytics.orders" in text
    assert warehouse.password not in stored_text(instance, result)


def test_an_unknown_connection_is_bad_input(example: ModuleType, warehouse: Warehouse) -> None:
    connections = warehouse.connections()
    del connections["wh2"]
    result = dg.materialize(
        [example.orders_assets], partition_key=DAY, raise_on_error=False,
        resources={"copyman": CopyManResource(connections=connections)},
    )
    assert not result.success and retries(result) == 0
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "no connection named 'wh2'" in serialize_value(failure.event_specific_data)


def test_a_three_day_backfill_loads_each_day_once(
    example: ModuleType, warehouse: Warehouse
) -> None:
    # A backfill runs one run per partition (a single-run policy would need partition ranges).
    instance = dg.DagsterInstance.ephemeral()
    runs = []
    for day in DAYS:
        result = materialize(example, warehouse, day=day, instance=instance)
        assert result.success
        runs.append(f"{result.run_id}:{day}")
    assert warehouse.wh1.execute(
        "SELECT day::text, count(*), count(DISTINCT id) FROM orders GROUP BY 1 ORDER BY 1"
    ) == [(day, PER_DAY, PER_DAY) for day in DAYS]
    # The replaced warehouse holds the last day loaded.
    assert warehouse.wh2.execute("SELECT DISTINCT day::text FROM analytics.orders") == [
        (DAYS[-1],)
    ]
    for key in (WH1, WH2):
        assert instance.get_materialized_partitions(key) == set(DAYS)
    # One ledger row per day, keyed by its run and partition.
    ledger = warehouse.wh1.execute("SELECT run_id, try_number FROM copyman_ledger ORDER BY 1")
    assert ledger == sorted((run, 1) for run in runs)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("orders", ["public", "orders"]),
        ("Sales.Orders", ["sales", "orders"]),
        # A quote is no character of a Dagster name: _ stands for it.
        (' "Sales" . "Or""ders" ', ["Sales", "Or_ders"]),
        ("SELECT * FROM orders", None),
    ],
)
def test_the_source_table_is_upstream_where_sql_names_one(
    table: str, expected: list[str] | None
) -> None:
    spec = CopyManLoad(source="src", sql=table, destinations=[{"conn": "wh", "table": "t"}])

    @copyman_assets(load=spec, name="load_orders")
    def assets(context: dg.AssetExecutionContext, copyman: CopyManResource) -> Any:
        yield from copyman.run(context)

    (deps,) = [list(s.deps) for s in assets.specs]
    assert [d.asset_key.path for d in deps] == ([["src", *expected]] if expected else [])
    assert [s.key.path for s in assets.specs] == [["wh", "public", "t"]]


class WarehouseTranslator(CopyManTranslator):
    """Keys under ``warehouse/<table>``, a group and an owner of their own."""

    def get_asset_spec(self, data: CopyManDestinationData) -> dg.AssetSpec:
        spec = super().get_asset_spec(data)
        return spec.replace_attributes(
            key=dg.AssetKey(["warehouse", data.destination.conn_id, data.table]),
            group_name="warehouse", owners=["team:data"], tags={"layer": "raw"},
        )


def test_a_translator_changes_keys_groups_and_owners(
    example: ModuleType, warehouse: Warehouse
) -> None:
    @copyman_assets(load=example.orders, name="translated", translator=WarehouseTranslator(),
                    partitions_def=dg.DailyPartitionsDefinition("2024-01-01"))
    def translated(context: dg.AssetExecutionContext, copyman: CopyManResource) -> Any:
        yield from copyman.run(context, parameters={"day": context.partition_key,
                                                    "min_amount": 0})

    wh2 = dg.AssetKey(["warehouse", "wh2", "orders"])
    assert {s.key for s in translated.specs} == {dg.AssetKey(["warehouse", "wh1", "orders"]), wh2}
    assert {(s.group_name, tuple(s.owners), s.tags["layer"]) for s in translated.specs} == {
        ("warehouse", ("team:data",), "raw")
    }
    result = dg.materialize(
        [translated], partition_key=DAY, selection=[wh2],
        resources={"copyman": CopyManResource(connections=warehouse.connections())},
    )
    assert [m.asset_key for m in result.asset_materializations_for_node("translated")] == [wh2]
    assert [e.asset_key for e in result.get_asset_check_evaluations()] == [wh2]
    assert warehouse.wh1.scalar("SELECT count(*) FROM orders") == 0


def test_a_connection_string_that_does_not_parse_is_named_not_shown(
    example: ModuleType, warehouse: Warehouse
) -> None:
    connections = {**warehouse.connections(), "wh2": "host=x password=s3cr3t-pw port"}
    result = dg.materialize(
        [example.orders_assets], partition_key=DAY, raise_on_error=False,
        resources={"copyman": CopyManResource(connections=connections)},
    )
    assert not result.success and retries(result) == 0
    text = events_text(result)
    assert "connection 'wh2': not a libpq connection string" in text
    assert "s3cr3t-pw" not in text


def test_bad_destinations_fail_when_the_code_location_loads() -> None:
    with pytest.raises(ConfigError, match=r"destination #1 \(wh, table t\): mode='merge' needs"):
        CopyManLoad(source="s", sql="t", destinations=[{"conn": "wh", "table": "t",
                                                        "mode": "merge"}])
    spec = CopyManLoad(source="s", sql="t", destinations=[{"conn": "wh", "table": "t"},
                                                          {"conn": "wh", "table": "public.t"}])
    with pytest.raises(dg.DagsterInvalidDefinitionError, match="wh/public/t"):
        copyman_assets(load=spec)(lambda context, copyman: None)


def test_a_row_count_mismatch_fails_its_check(warehouse: Warehouse) -> None:
    # verify="count": wh1 drops every other row it is sent (a trigger), so its COPY counts
    # fewer rows than the source sent.
    warehouse.wh1.execute(
        "CREATE FUNCTION odd_only() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
        "IF NEW.id % 2 = 0 THEN RETURN NULL; END IF; RETURN NEW; END$$; CREATE TRIGGER odd "
        "BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION odd_only()"
    )
    spec = CopyManLoad(source="pg_src", sql="SELECT * FROM orders WHERE day = '2024-01-02'",
                       destinations=[{"conn": "wh1", "table": "orders"}])

    @copyman_assets(load=spec, name="counted")
    def counted(context: dg.AssetExecutionContext, copyman: CopyManResource) -> Any:
        yield from copyman.run(context)

    result = dg.materialize(
        [counted], raise_on_error=False,
        resources={"copyman": CopyManResource(connections=warehouse.connections())},
    )
    assert not result.success and retries(result) == 0
    assert materializations(result) == {}
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.asset_key == WH1 and not evaluation.passed
    values = {k: v.value for k, v in evaluation.metadata.items()}
    assert (values["source_rows"], values["destination_rows"]) == (PER_DAY, PER_DAY // 2)
    assert warehouse.wh1.scalar("SELECT count(*) FROM orders") == 0


def test_checks_alone_say_to_select_their_assets(warehouse: Warehouse) -> None:
    spec = CopyManLoad(source="pg_src", sql="orders",
                       destinations=[{"conn": "wh1", "table": "orders"}])

    @copyman_assets(load=spec, name="checked")
    def checked(context: dg.AssetExecutionContext, copyman: CopyManResource) -> Any:
        yield from copyman.run(context)

    result = dg.materialize(
        [checked], selection=dg.AssetSelection.checks_for_assets(WH1), raise_on_error=False,
        resources={"copyman": CopyManResource(connections=warehouse.connections())},
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "select their assets too" in serialize_value(failure.event_specific_data)
    assert warehouse.wh1.scalar("SELECT count(*) FROM orders") == 0


def test_a_single_run_backfill_loads_its_range_once(warehouse: Warehouse) -> None:
    spec = CopyManLoad(
        source="pg_src", sql="SELECT * FROM orders WHERE day BETWEEN %(first)s AND %(last)s",
        destinations=[{"conn": "wh1", "table": "orders", "mode": "merge", "key": "id"}],
    )

    @copyman_assets(load=spec, name="ranged", backfill_policy=dg.BackfillPolicy.single_run(),
                    partitions_def=dg.DailyPartitionsDefinition("2024-01-01"))
    def ranged(context: dg.AssetExecutionContext, copyman: CopyManResource) -> Any:
        keys = context.partition_key_range
        yield from copyman.run(context, parameters={"first": keys.start, "last": keys.end})

    result = dg.materialize(
        [ranged], raise_on_error=False,
        tags={"dagster/asset_partition_range_start": DAYS[0],
              "dagster/asset_partition_range_end": DAYS[-1]},
        resources={"copyman": CopyManResource(connections=warehouse.connections())},
    )
    assert result.success
    assert warehouse.wh1.execute(
        "SELECT day::text, count(*) FROM orders GROUP BY 1 ORDER BY 1"
    ) == [(day, PER_DAY) for day in DAYS]
    assert warehouse.wh1.execute("SELECT run_id FROM copyman_ledger") == [
        (f"{result.run_id}:{DAYS[0]}...{DAYS[-1]}",)
    ]
