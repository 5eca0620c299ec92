"""``@copyman_assets``: a load as a multi-asset, one asset (and one check) per destination."""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

from airflow_copyman.dagster._load import CopyManLoad
from airflow_copyman.dagster._translator import CopyManTranslator, destination_data
from airflow_copyman.load import ConfigError, Destination

#: The name of the check each destination's asset carries: the load's verification.
CHECK_NAME = "copyman_verify"


@dataclass(frozen=True)
class Binding:
    """A load and the asset key of each of its destinations (as the translator made them)."""

    load: CopyManLoad
    keys: tuple[tuple[Destination, dg.AssetKey], ...]


#: The binding of the multi-asset whose body runs now: CopyManResource.run reads it, so the
#: body need not pass the load again (set around the body, in the step's own thread).
_current: contextvars.ContextVar[Binding] = contextvars.ContextVar("copyman_binding")


def current_binding() -> Binding:
    try:
        return _current.get()
    except LookupError:
        raise ConfigError(
            "CopyManResource.run must be called from the body of a @copyman_assets function"
        ) from None


def copyman_assets(
    *,
    load: CopyManLoad,
    name: str | None = None,
    group_name: str | None = None,
    partitions_def: dg.PartitionsDefinition[Any] | None = None,
    translator: CopyManTranslator | None = None,
    retry_policy: dg.RetryPolicy | None = None,
    backfill_policy: dg.BackfillPolicy | None = None,
    op_tags: Mapping[str, Any] | None = None,
    pool: str | None = None,
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """Turn a function calling ``copyman.run(context, ...)`` into the load's assets: one per
    destination (keys from ``translator``), each with the check ``copyman_verify``;
    subsettable (materializing one destination's asset loads only that destination)."""
    translator = translator or CopyManTranslator()
    specs: list[dg.AssetSpec] = []
    keys: list[tuple[Destination, dg.AssetKey]] = []
    for destination in load.specs:
        spec = translator.get_asset_spec(destination_data(load, destination))
        if group_name is not None:
            spec = spec.replace_attributes(group_name=group_name)
        specs.append(spec)
        keys.append((destination, spec.key))
    every = [k for _, k in keys]
    duplicates = sorted({k.to_user_string() for k in every if every.count(k) > 1})
    if duplicates:
        raise dg.DagsterInvalidDefinitionError(
            f"two destinations of one load have the asset key {', '.join(duplicates)}: "
            "give a translator that tells them apart"
        )
    what = "checksum" if load.verify == "checksum" else "row count"
    checks = [
        dg.AssetCheckSpec(
            CHECK_NAME,
            asset=spec.key,
            description=f"the destination's {what} equals the source's",
        )
        for spec in specs
    ]
    binding = Binding(load, tuple(keys))

    def decorate(fn: Callable[..., Any]) -> dg.AssetsDefinition:
        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Iterator[Any]:
            token = _current.set(binding)
            try:
                out = fn(*args, **kwargs)
                if out is not None:
                    yield from out
            finally:
                _current.reset(token)

        # Dagster reads the resources and config a body takes from its signature, and
        # resolves string annotations in the wrapper's module: give it the resolved ones.
        signature = inspect.signature(fn, eval_str=True)
        body.__signature__ = signature  # type: ignore[attr-defined]
        body.__annotations__ = {
            p.name: p.annotation
            for p in signature.parameters.values()
            if p.annotation is not inspect.Parameter.empty
        }
        return dg.multi_asset(
            specs=specs,
            check_specs=checks,
            name=name or load.name or fn.__name__,
            can_subset=True,
            partitions_def=partitions_def,
            retry_policy=retry_policy,
            backfill_policy=backfill_policy,
            op_tags=op_tags,
            pool=pool,
        )(body)

    return decorate
