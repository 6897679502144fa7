"""Records (attempts, restore tests, PITR drills, reports) stored in the repository beside the backups,
so history survives the loss of the Dagster instance."""

from __future__ import annotations

import json

from dr_pipelines.core.storage.base import Location, LocationError

# --------------------------------------------------------------------------- history records
# Reports of restores, restore tests and backup attempts: small JSON objects under
# <database>/reports/<kind>/<started_at>.json, on every location that accepts them.


def store_record(locations: dict[str, Location], database: str, kind: str, started_at: str, data: bytes,
                 log=lambda msg: None) -> list[str]:
    key = f"{database}/reports/{kind}/{started_at.replace(':', '')}.json"
    stored = []
    for name, loc in locations.items():
        try:
            loc.put_bytes(key, data)
            stored.append(name)
        except LocationError as e:
            log(f"warning: could not store the {kind} record on {name}: {e}")
    return stored


def load_reports(locations: dict[str, Location], database: str, kind: str) -> list[dict]:
    """Records of one kind, newest first, merged across locations."""
    seen: dict[str, dict] = {}
    for loc in locations.values():
        try:
            for obj in loc.list(f"{database}/reports/{kind}/"):
                if obj.key not in seen and obj.key.endswith(".json"):
                    seen[obj.key] = json.loads(loc.get_bytes(obj.key))
        except (LocationError, ValueError):
            continue
    return sorted(seen.values(), key=lambda r: r["started_at"], reverse=True)
