"""Launchpad fields whose values are the configured names: the form completes them, and a typo is
refused by Dagster's config check before the run starts."""

from typing import Literal

import dagster as dg
from pydantic import create_model


def with_choices(base: type[dg.Config], **choices: list[str]) -> type[dg.Config]:
    """`base` with each named str field restricted to the given names (an enum in the config schema);
    the field keeps its description and default. A field with no names to choose from is left as it is."""
    fields = {}
    for name, values in choices.items():
        if not values:
            continue
        info = base.model_fields[name]
        fields[name] = (Literal[tuple(values)], info)  # type: ignore[valid-type]
    if not fields:
        return base
    return create_model(base.__name__, __base__=base, **fields)  # type: ignore[call-overload]
