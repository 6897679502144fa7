"""Opening the config's locations, with clients given (Dagster resources) or built from the config (shell)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dr_pipelines.core.config import (
    GCSLocationConfig,
    LocalLocationConfig,
    S3LocationConfig,
)
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.storage.gcs import GCSLocation, gcs_client
from dr_pipelines.core.storage.local import LocalLocation
from dr_pipelines.core.storage.s3 import S3Location, s3_client


def open_location(name: str, cfg, base_dir: Path, client: Any = None) -> Location:
    if isinstance(cfg, LocalLocationConfig):
        return LocalLocation.from_config(name, cfg, base_dir)
    if isinstance(cfg, S3LocationConfig):
        location = S3Location(name, cfg, client or s3_client(name, cfg))
        location.check_object_lock()
        return location
    if isinstance(cfg, GCSLocationConfig):
        gcs = GCSLocation(name, cfg, client or gcs_client(cfg))
        gcs.ensure_retention_policy()
        return gcs
    raise TypeError(f"unknown location config {cfg!r}")


def open_locations(config, only: str | None = None, clients: dict[str, Any] | None = None) -> dict[str, Location]:
    """Locations in the config's order (its order of preference for restores)."""
    clients = clients or {}
    return {
        name: open_location(name, config.locations[name], config.base_dir, clients.get(name))
        for name in config.location_names(only)
    }
