"""The code location Dagster loads (`dagster dev -w workspace.yaml`): definitions built from
$DR_PIPELINES_CONFIG, else from the embedded sandbox (whose config is written to a file, so the
commands PostgreSQL runs for us can name it)."""

from dr_pipelines.defs.build import build_definitions
from dr_pipelines.sandbox.config import config_and_file

defs = build_definitions(*config_and_file())
