"""Which locations answer now: a recovery during an outage uses the reachable ones and says which
it left out (a location that cannot rule a file out would otherwise abort PostgreSQL's recovery)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from dr_pipelines.core.errors import DrError
from dr_pipelines.core.storage.base import Location, LocationError, describe_error

PROBE_PREFIX = "_probe/"  # listed, never written: an answer (even empty) means the location is up


def probe_one(location: Location) -> str | None:
    """None when the location answers a listing; otherwise why not."""
    try:
        next(iter(location.list(PROBE_PREFIX)), None)
    except LocationError as e:
        return str(e)
    except Exception as e:  # a client library's own error: still "down", with its words
        return describe_error(e)
    return None


def probe(locations: dict[str, Location]) -> dict[str, str | None]:
    """Every location at once (a dead one costs its timeouts, not the sum of them), in config order."""
    if not locations:
        return {}
    with ThreadPoolExecutor(max_workers=len(locations), thread_name_prefix="probe") as pool:
        answers = dict(zip(locations, pool.map(probe_one, locations.values()), strict=True))
    return {name: answers[name] for name in locations}


def reachable(locations: dict[str, Location]) -> tuple[dict[str, Location], dict[str, str]]:
    """(the locations that answer, in config order; the others with why)."""
    answers = probe(locations)
    up = {n: loc for n, loc in locations.items() if answers[n] is None}
    down = {n: reason for n, reason in answers.items() if reason is not None}
    return up, down


class NoLocationAnswers(DrError):
    """Every location is down: a recovery cannot start (nothing was touched)."""


def usable_locations(
    config, locations: dict[str, Location], only: list[str] | None
) -> tuple[dict[str, Location], dict[str, str]]:
    """What a recovery reads: the locations named (`only`), else those that answer now; and the others,
    each with why it was left out. No location answering is an error saying what each one said."""
    if only:
        for name in only:
            config.location_names(name)  # an unknown name is a config error naming the configured ones
        return {n: locations[n] for n in only}, {n: "not chosen (locations)" for n in locations if n not in only}
    up, down = reachable(locations)
    if not up:
        raise NoLocationAnswers(
            "no location answers: "
            + "; ".join(f"{n}: {why}" for n, why in down.items())
            + ". Nothing was touched; bring one back (or fix its credentials) and run the recovery again"
        )
    return up, down
