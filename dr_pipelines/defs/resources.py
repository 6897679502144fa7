"""Resources: the DR config, and the storage clients from dagster-aws / dagster-gcp."""

from typing import Any, Optional

import dagster as dg
from dr_pipelines.core.config import (
    DrConfig,
    GCSLocationConfig,
    S3LocationConfig,
    load_config,
)
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.storage.locations import open_locations


class DrConfigResource(dg.ConfigurableResource):
    """The DR configuration file (empty: $DR_PIPELINES_CONFIG, else the embedded sandbox)."""

    config_file: Optional[str] = None

    def load(self) -> DrConfig:
        return load_config(self.config_file)


def client_resource_key(location_name: str, cfg: Any) -> Optional[str]:
    if isinstance(cfg, S3LocationConfig):
        return f"s3_{location_name}"
    if isinstance(cfg, GCSLocationConfig):
        return f"gcs_{location_name}"
    return None


def storage_resources(config: DrConfig) -> dict[str, dg.ConfigurableResource]:
    """One S3Resource / GCSResource per remote location; credentials stay in env vars (EnvVar).

    dagster-aws and dagster-gcp are imported only when such a location exists: together they take
    ~3 s to import (dagster-gcp pulls in BigQuery), which every shell restore would otherwise pay."""
    out: dict[str, dg.ConfigurableResource] = {}
    for name, cfg in config.locations.items():
        key = client_resource_key(name, cfg)
        if isinstance(cfg, S3LocationConfig):
            from dagster_aws.s3 import S3Resource

            creds = {}
            if cfg.access_key_id_env and cfg.secret_access_key_env:
                creds = {"aws_access_key_id": dg.EnvVar(cfg.access_key_id_env),
                         "aws_secret_access_key": dg.EnvVar(cfg.secret_access_key_env)}
            out[key] = S3Resource(region_name=cfg.region, endpoint_url=cfg.endpoint_url, max_attempts=5, **creds)
        elif isinstance(cfg, GCSLocationConfig):
            from dagster_gcp.gcs import GCSResource

            out[key] = GCSResource(project=cfg.project)
    return out


def storage_resource_keys(config: DrConfig) -> set[str]:
    return set(storage_resources(config))


def locations_from_context(context: dg.OpExecutionContext, config: DrConfig,
                           only: str | None = None) -> dict[str, Location]:
    """The config's locations, with clients taken from the run's resources."""
    clients = {}
    for name, cfg in config.locations.items():
        key = client_resource_key(name, cfg)
        if key is not None and (only is None or only == name):
            resource = getattr(context.resources, key)
            # S3Resource resolves to the boto3 client itself; GCSResource to a resource object
            clients[name] = resource.get_client() if hasattr(resource, "get_client") else resource
    return open_locations(config, only, clients)
