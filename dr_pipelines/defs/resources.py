"""`DrResource`: the one typed resource every asset, check, op and sensor takes.

It names the DR config file and hands out the config and its locations. Remote locations nest
dagster-aws's `S3Resource` and dagster-gcp's `GCSResource` (one per location, so each keeps its own
endpoint and credentials). Those two packages take ~3 s each to import (dagster-gcp pulls in
BigQuery), so a deployment without such a location never imports them: `dr_resource` builds the
resource class with only the client fields the config needs.
"""

from functools import cache
from typing import Any

import dagster as dg
from pydantic import Field

from dr_pipelines.core.config import DrConfig, GCSLocationConfig, S3LocationConfig, load_config
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.storage.locations import open_locations


class DrResource(dg.ConfigurableResource):
    """The DR configuration (one file for the whole fleet) and its storage locations."""

    config_file: str = Field(description="The DR config file; the sandbox writes its own (sandbox.yaml).")
    sandbox: bool = Field(default=False, description="The embedded sandbox: its cluster is started on demand.")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # The one place the sandbox cluster is started, for every run that touches it.
        if self.sandbox:
            from dr_pipelines.sandbox.config import ensure_sandbox_running

            log = context.log.info if context.log else print
            ensure_sandbox_running(self.config(), log=log)

    def config(self) -> DrConfig:
        return load_config(self.config_file, sandbox=self.sandbox)

    def clients(self) -> dict[str, Any]:
        """boto3 / google-cloud-storage clients of the remote locations, by location name."""
        return {}

    def locations(self, config: DrConfig | None = None, only: str | None = None) -> dict[str, Location]:
        """The config's locations in preference order (only one, when named), with this run's clients."""
        return open_locations(config or self.config(), only, self.clients())


def _client_of(name: str, resource: Any, config: DrConfig) -> Any:
    """GCSResource's client as it is (every call then passes the location's timeouts); for S3 the
    resource's credentials and endpoint in a client with the location's timeouts and retries, which
    S3Resource cannot set (its client waits the boto3 default of a minute per attempt)."""
    cfg = config.locations[name]
    if isinstance(cfg, S3LocationConfig):
        from dr_pipelines.core.storage.s3 import s3_client

        creds = {k: v for k in ("aws_access_key_id", "aws_secret_access_key") if (v := getattr(resource, k))}
        return s3_client(name, cfg, creds or None)
    return resource.get_client()


@cache
def _resource_with_clients(s3: bool, gcs: bool) -> type[DrResource]:
    annotations: dict[str, Any] = {}
    if s3:
        from dagster_aws.s3 import S3Resource

        annotations["s3"] = dict[str, S3Resource]
    if gcs:
        from dagster_gcp.gcs import GCSResource

        annotations["gcs"] = dict[str, GCSResource]

    def clients(self) -> dict[str, Any]:
        config = self.config()
        return {name: _client_of(name, r, config) for field in annotations for name, r in getattr(self, field).items()}

    namespace = {
        "__annotations__": annotations,
        "clients": clients,
        "__doc__": DrResource.__doc__,
        **{
            field: Field(default_factory=dict, description=f"{field.upper()} clients, per location")
            for field in annotations
        },
    }
    return type("DrResource", (DrResource,), namespace)


def dr_resource(config: DrConfig, config_file: str, sandbox: bool = False) -> DrResource:
    """The resource for this config; credentials stay in environment variables (dg.EnvVar)."""
    s3: dict[str, Any] = {}
    gcs: dict[str, Any] = {}
    for name, cfg in config.locations.items():
        if isinstance(cfg, S3LocationConfig):
            from dagster_aws.s3 import S3Resource

            creds: dict[str, Any] = {}
            if cfg.access_key_id_env and cfg.secret_access_key_env:
                creds = {
                    "aws_access_key_id": dg.EnvVar(cfg.access_key_id_env),
                    "aws_secret_access_key": dg.EnvVar(cfg.secret_access_key_env),
                }
            s3[name] = S3Resource(region_name=cfg.region, endpoint_url=cfg.endpoint_url, max_attempts=5, **creds)
        elif isinstance(cfg, GCSLocationConfig):
            from dagster_gcp.gcs import GCSResource

            gcs[name] = GCSResource(project=cfg.project)
    if not s3 and not gcs:
        return DrResource(config_file=config_file, sandbox=sandbox)
    cls = _resource_with_clients(bool(s3), bool(gcs))
    return cls(config_file=config_file, sandbox=sandbox, **({"s3": s3} if s3 else {}), **({"gcs": gcs} if gcs else {}))
