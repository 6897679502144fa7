"""Launchpad fields whose values are the configured names: the form completes them, and a typo is
refused by Dagster's config check before the run starts."""

from enum import Enum
from typing import Literal, Optional

import dagster as dg
from pydantic import create_model


def with_choices(base: type[dg.Config], **choices: list[str]) -> type[dg.Config]:
    """`base` with each named field (str, or an optional list of str) restricted to the given names (an
    enum in the config schema); the field keeps its description and default. A field with no names to
    choose from is left as it is."""
    fields = {}
    for name, values in choices.items():
        if not values:
            continue
        info = base.model_fields[name]
        names = Literal[tuple(values)]  # type: ignore[valid-type]
        if info.annotation is str:
            fields[name] = (names, info)
        elif info.annotation == Optional[list[str]]:  # Dagster takes no Literal in a list: an Enum there
            members = Enum(f"{base.__name__}_{name}", {v: v for v in values})  # type: ignore[misc]
            fields[name] = (Optional[list[members]], info)  # type: ignore[valid-type]
        else:
            raise TypeError(f"{base.__name__}.{name}: only str and Optional[list[str]] fields take choices")
    if not fields:
        return base
    return create_model(base.__name__, __base__=base, **fields)  # type: ignore[call-overload]


def chosen(values: list | None) -> list[str] | None:
    """The names a list field holds (Enum members from the Launchpad's form, or plain strings)."""
    if values is None:
        return None
    return [v.value if isinstance(v, Enum) else v for v in values]
