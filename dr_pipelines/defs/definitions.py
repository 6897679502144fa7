"""The code location Dagster loads (`dagster dev -w workspace.yaml`): definitions built from
$DR_PIPELINES_CONFIG, else from the embedded sandbox."""

import os

from dr_pipelines.core.config import CONFIG_ENV, load_config
from dr_pipelines.defs.build import build_definitions


def _load():
    config_file = os.environ.get(CONFIG_ENV) or None
    return build_definitions(load_config(config_file), config_file)


defs = _load()
