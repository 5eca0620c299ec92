"""LoadOptions: every option checked once, where it is built, naming the option (no server)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from airflow_copyman import load


def test_defaults_are_the_loads() -> None:
    options = load.LoadOptions()
    assert options.format is None and options.verify == "count"
    assert options.lock_timeout == load.LOCK_TIMEOUT
    assert options.progress_interval == load.PROGRESS_INTERVAL
    assert options.min_rows == 0 and options.max_bytes_per_second is None


def test_it_is_frozen_and_normalised() -> None:
    given: dict[str, Any] = {"min_rows": "7"}  # as Jinja renders a number
    options = load.LoadOptions(format="TEXT", parameters=[], receiver_timeout=3, **given)
    assert options.format == "text"
    assert options.min_rows == 7
    assert options.parameters is None  # nothing to bind
    assert options.receiver_timeout == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.verify = "checksum"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("format", "xml", "format must be one of binary, text, csv"),
        ("parameters", "a", "parameters must be a list"),
        ("verify", "sha", "verify must be one of 'count', 'checksum'"),
        ("receiver_timeout", 0, "receiver_timeout must be more than zero seconds"),
        ("lock_timeout", True, "lock_timeout must be a number of seconds"),
        ("progress_interval", -1, "progress_interval must be zero or more seconds"),
        ("min_rows", -2, "min_rows must be zero or more"),
        ("max_bytes_per_second", "100", "max_bytes_per_second must be a number of bytes"),
    ],
)
def test_a_bad_option_is_refused_by_name(name: str, value: object, message: str) -> None:
    given: dict[str, Any] = {name: value}
    with pytest.raises(load.ArgumentError, match=message):
        load.LoadOptions(**given)
    with pytest.raises(load.ArgumentError, match=message):
        load.LoadOptions.check_known(**given)


def test_check_known_leaves_templated_values_for_later() -> None:
    templated = ("min_rows", "max_bytes_per_second")
    load.LoadOptions.check_known(
        templated=templated, min_rows="{{ params.n }}", max_bytes_per_second="{{ x }}"
    )
    # An option that is not templated is checked even when it looks like a template.
    with pytest.raises(load.ArgumentError, match="verify"):
        load.LoadOptions.check_known(templated=templated, verify="{{ x }}")
    with pytest.raises(TypeError, match="not options of a load: colour"):
        load.LoadOptions.check_known(colour="red")


def test_rendered_text_is_taken_as_the_value_it_renders() -> None:
    assert load.LoadOptions.from_rendered(max_bytes_per_second="None").max_bytes_per_second is None
    assert load.LoadOptions.from_rendered(max_bytes_per_second=" 2e3 ").max_bytes_per_second == 2e3
    assert load.LoadOptions.from_rendered(min_rows="12").min_rows == 12


def test_run_and_transfer_refuse_bad_options_as_config_errors() -> None:
    source = load.postgres("src", "host=/nonexistent dbname=x")
    with pytest.raises(load.ConfigError, match="verify must be one of"):
        load.Transfer(source, "t", [{"conn_id": "d", "table": "t"}], endpoints={}, verify="x")
    with pytest.raises(load.ConfigError, match="min_rows must be zero or more"):
        load.run(source, "t", [{"conn_id": "d", "table": "t"}], endpoints={}, min_rows=-1)
