"""Dagster run config generated from the library's pydantic schema (``flowbp_ops.params``).

Each ``params.yaml`` section becomes a Dagster ``Config`` class with the same fields,
descriptions and (from ``params.yaml``) defaults, so the launchpad shows exactly the
settings DVC and the CLI use. Values are validated again by the library's own models
(``Literal`` choices, ranges), so an impossible setting fails with the same message everywhere.
"""

from __future__ import annotations

import os
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel, Field, create_model

from flowbp_ops.params import Params, load_params


def _dagster_type(annotation: Any) -> Any:
    """Dagster config supports scalars, lists, dicts and Optional; Literal and tuple are mapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # validators stay with the library's schema (``apply``)
        return _dagster_type(typing.get_args(annotation)[0])
    if origin is list:
        return list[_dagster_type(typing.get_args(annotation)[0])]
    if origin is typing.Literal:
        return str
    if origin is tuple:
        return list[float]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _dagster_type(args[0]) | None if len(args) == 1 else Any
    return annotation


def _js_exponent(value: Any) -> bool:
    """True for floats JavaScript prints in exponent form (``1e-8``). The Dagster UI rebuilds the
    launchpad YAML in JavaScript when a partition is picked, and YAML 1.1 reads ``1e-8`` back as a
    string, so a ``float`` field would reject its own default; such fields take any scalar here and
    the library's schema (``apply``) validates them as numbers."""
    return isinstance(value, float) and value != 0 and not 1e-6 <= abs(value) < 1e21


def section_config(name: str, model: type[BaseModel], values: BaseModel) -> type[dg.Config]:
    fields = {}
    for fname, f in model.model_fields.items():
        default = getattr(values, fname)
        if isinstance(default, tuple):
            default = list(default)
        kind = Any if _js_exponent(default) else _dagster_type(f.annotation)
        fields[fname] = (kind, Field(default=default, description=f.description))
    return create_model(name, __base__=dg.Config, **fields)


@lru_cache(maxsize=1)
def defaults() -> Params:
    """``params.yaml`` of the working directory, or the file ``$FLOWBP_PARAMS`` names."""
    return load_params(Path(os.environ.get("FLOWBP_PARAMS", "params.yaml")))


def stage_config(stage_name: str, sections: list[str]) -> type[dg.Config]:
    """The run config of one stage: one nested field per ``params.yaml`` section it reads."""
    params = defaults()
    fields: dict[str, Any] = {}
    for sec in sections:
        value = getattr(params, sec)
        if isinstance(value, BaseModel):
            cls = section_config(f"{sec.title().replace('_', '')}Config", type(value), value)
            fields[sec] = (cls, Field(default_factory=cls))
        else:
            fields[sec] = (type(value), Field(default=value))
    return create_model(f"{stage_name.title().replace('_', '')}Config", __base__=dg.Config, **fields)


def apply(config: dg.Config) -> Params:
    """``params.yaml`` with a run's config on top, validated by the library's schema."""
    from flowbp_ops.params import params_from

    base = defaults().model_dump(mode="json")
    for sec, value in config.model_dump().items():
        base[sec] = value
    return params_from(base, origin="run config")  # errors name the field, never echo the value (a URL's secret)
