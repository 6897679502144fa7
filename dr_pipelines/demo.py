"""`dr-pipelines demo`: the sandbox end to end, then the Dagster UI on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from dr_pipelines.core.sandbox import ensure_sandbox_running, sandbox_config, sandbox_dir

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or sandbox_dir() / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def run_demo(serve_ui: bool = True, port: int = 3000) -> int:
    os.environ.pop("DR_PIPELINES_CONFIG", None)  # the demo is the embedded sandbox, always
    config = sandbox_config()
    ensure_sandbox_running(config)
    os.environ["DAGSTER_HOME"] = str(_dagster_home())

    from dr_pipelines.defs.runner import materialize_logical_backup

    db = next(iter(config.databases))
    print(f"\n== taking a logical backup of the sandbox database '{db}' (Dagster job, recorded in "
          f"{os.environ['DAGSTER_HOME']})", flush=True)
    manifest = materialize_logical_backup(config, db, None)
    location = next(iter(config.locations.values()))
    obj = Path(location.resolved_path(config.base_dir)) / manifest.object_key(manifest.objects[0].name)
    identity = config.encryption.identity_path()
    print(f"""
backup id:  {manifest.id}
object:     {obj}  ({manifest.size_bytes} bytes, sha256 {manifest.objects[0].sha256[:16]}...)
manifest:   {obj.parent / 'manifest.json'}
tables:     {', '.join(f'{t}={n}' for t, n in manifest.tables.items())}

restore it by hand, without this project:
  age -d -i {identity} {obj} | zstd -d | pg_restore -h 127.0.0.1 -p {config.databases[db].port} -U postgres -d <new empty database>
list and verify backups:
  dr-pipelines backups list {db}
  dr-pipelines backups verify {db} --latest
""", flush=True)
    from dr_pipelines.defs.runner import restore_test

    print(f"== restore test: restoring {manifest.id} into a scratch database and checking it against the manifest",
          flush=True)
    md = restore_test(config, None, db, manifest.id, keep=False)
    print(f"restore test {'PASSED' if md['passed'] else 'FAILED'}: {md['tables']} tables, {md['rows']} rows, "
          f"measured RTO {md['rto_s']:.1f}s (objective {config.databases[db].objectives.rto})\n", flush=True)
    if not serve_ui:
        return 0 if md["passed"] else 1
    print(f"== Dagster UI on http://127.0.0.1:{port} (Ctrl-C to stop)", flush=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(port),
         "-w", str(PROJECT_ROOT / "workspace.yaml")],
        cwd=str(PROJECT_ROOT), env=os.environ.copy(), start_new_session=True,
    )
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0
