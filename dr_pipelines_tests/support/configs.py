"""Config pieces the tests write: locations, the age key, the config as the product loads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dr_pipelines.core.config import load_config
from dr_pipelines_tests.support.servers import HttpServer

BUCKET = "dr-backups"


# --------------------------------------------------------------------------- keys and configs


@dataclass
class AgeKey:
    identity_file: Path
    recipient: str


def local_location(path: Path) -> dict:
    return {"type": "local", "path": str(path)}


def s3_location(server: HttpServer, prefix: str = "soundhash-backups/") -> dict:
    return {
        "type": "s3",
        "bucket": BUCKET,
        "prefix": prefix,
        "endpoint_url": server.url,
        "region": "us-east-1",
        "storage_class": "STANDARD_IA",
        "sse": "AES256",
        "multipart_chunk_mb": 5,
    }


def gcs_location(prefix: str = "soundhash-backups/") -> dict:
    return {"type": "gcs", "bucket": BUCKET, "prefix": prefix, "project": "test", "chunk_mb": 1}


def config_from(path: Path):
    return load_config(path)
