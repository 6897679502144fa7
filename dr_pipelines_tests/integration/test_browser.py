"""The Dagster UI driven in a real browser, the way a user gets there: `dr-pipelines demo --no-ui`
builds a fresh sandbox (backups, restore test, PITR demo, file snapshots, drill), then `dagster dev`
serves the demo's code location; Playwright (Debian's chromium) reads the lineage, the asset pages
and launches restores from the Launchpad. What the runs did is checked against PostgreSQL itself.

Screenshots of each page go to docs/screenshots/; on a failure, one of the page is saved in the
test's tmp_path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from dr_pipelines.core.postgres.cluster import LocalCluster, free_port
from dr_pipelines_tests.support.postgres import PgServer
from dr_pipelines_tests.support.processes import PROJECT_ROOT, VENV_BIN, reachable_tmpdir, sandbox_ports, stop_process

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():  # not a skip: CI would pass without ever opening the UI
    pytest.fail(f"{CHROMIUM} is not installed (Debian's chromium drives the UI tests); run ./dev setup", pytrace=False)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# the README's pictures: refreshed with DR_UPDATE_SCREENSHOTS=1 ./dev test -k browser; other runs keep
# theirs out of the checkout
SCREENSHOTS = (
    PROJECT_ROOT / "docs" / "screenshots"
    if os.environ.get("DR_UPDATE_SCREENSHOTS")
    else Path(tempfile.gettempdir()) / "dr_pipelines_screenshots"
)
LOCATION = "dr_pipelines.defs.definitions"  # `dagster dev -m <module>` names the code location after it
DB = "soundhash"
RUN_TIMEOUT_MS = 180_000
NUMERIC_METADATA = ["compression_ratio", "duration_s", "rows", "size_bytes", "tables", "uncompressed_bytes"]


@dataclass
class Ui:
    url: str
    sandbox: Path
    pg: PgServer  # the sandbox cluster
    backup_id: str  # the newest logical backup, taken after the demo: it holds what the source holds
    backup_rows: int  # the source's rows when it was taken
    env: dict[str, str]
    log: Path


def _graphql(url: str, query: str) -> dict:
    req = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)


LOCATION_STATUS = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def _wait_for_ui(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """The webserver answers and the code location is loaded (not only /server_info)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster dev exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(f"{url}/server_info", timeout=2).read()
            entries = _graphql(url, LOCATION_STATUS)["data"]["workspaceOrError"]["locationEntries"]
            [entry] = [e for e in entries if e["name"] == LOCATION]
            loaded = entry["locationOrLoadError"] or {}
            if loaded.get("__typename") == "PythonError":
                raise RuntimeError(f"the code location failed to load: {loaded['message']}")
            if entry["loadStatus"] == "LOADED" and loaded.get("__typename") == "RepositoryLocation":
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Dagster UI did not come up within {timeout}s:\n{log.read_text()[-4000:]}")


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(VENV_BIN / "dr-pipelines"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"dr-pipelines {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def ui() -> Iterator[Ui]:
    sandbox = reachable_tmpdir("drpt-browser-")
    pg_port, ui_port = sandbox_ports(), free_port()
    env = {
        **os.environ,
        "DR_PIPELINES_SANDBOX_DIR": str(sandbox),
        "DR_PIPELINES_SANDBOX_PORT": str(pg_port),
        "DAGSTER_HOME": str(sandbox / "dagster_home"),
    }
    env.pop("DR_PIPELINES_CONFIG", None)  # the embedded sandbox, as a new user has it
    log = sandbox / "dagster-dev.log"
    proc: subprocess.Popen | None = None
    with pytest.MonkeyPatch.context() as mp:  # this process reads the same sandbox (its config, its cluster)
        for name in ("DR_PIPELINES_SANDBOX_DIR", "DR_PIPELINES_SANDBOX_PORT", "DAGSTER_HOME"):
            mp.setenv(name, env[name])
        mp.delenv("DR_PIPELINES_CONFIG", raising=False)
        from dr_pipelines.sandbox.config import config_and_file, sandbox_cluster

        try:
            demo = subprocess.run(
                [str(VENV_BIN / "dr-pipelines"), "demo", "--no-ui"],
                env=env,
                cwd=str(sandbox),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert demo.returncode == 0, f"the demo failed ({demo.returncode}):\n{demo.stdout}\n{demo.stderr}"
            assert "point-in-time recovery PASSED" in demo.stdout, demo.stdout  # the sandbox archives WAL
            config = config_and_file()[0]
            assert config.databases[DB].port == pg_port
            pg = PgServer(sandbox_cluster(config), sandbox)
            # the demo's PITR deleted rows after its logical backup: a new one holds what the source holds
            backup_id = _cli(env, "backup", DB, "--label", "browser-test").strip().splitlines()[-1]
            backup_rows = sum(pg.row_counts(DB).values())
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(ui_port), "-m", LOCATION],
                    cwd=str(sandbox),
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            url = f"http://127.0.0.1:{ui_port}"
            _wait_for_ui(url, proc, log)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            yield Ui(url, sandbox, pg, backup_id, backup_rows, env, log)
        finally:
            if proc is not None:
                stop_process(proc)
            sandbox_cluster().stop("immediate")
            shutil.rmtree(sandbox, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(ui: Ui, browser: Browser, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Page]:
    """A fresh browser context per test; its page is saved into tmp_path if the test fails."""
    context = browser.new_context(base_url=ui.url, viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(60_000)
    expect.set_options(timeout=60_000)
    pg = context.new_page()
    failed_before = request.session.testsfailed
    yield pg
    if request.session.testsfailed > failed_before:
        shot = tmp_path / f"{request.node.name}-failure.png"
        pg.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the page at the failure: {shot} ({pg.url})")
    context.close()


# --------------------------------------------------------------------------- helpers


def _launch_from_launchpad(page: Page, job: str, run_config: str, screenshot: str | None = None) -> str:
    """Open the job's Launchpad, replace its config with `run_config` (pasted, as a user would),
    check the Launchpad finds no error, launch; returns the run page's URL."""
    page.goto(f"/locations/{LOCATION}/jobs/{job}/playground")
    editor = page.locator(".CodeMirror").first
    expect(page.get_by_role("button", name="Launch Run")).to_be_visible()
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(run_config)
    assert editor.evaluate("e => e.CodeMirror.getValue()") == run_config
    expect(page.get_by_text("No errors", exact=True)).to_be_visible()
    if screenshot:
        page.screenshot(path=str(SCREENSHOTS / screenshot))
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    return page.url


def _run_status(page: Page) -> str:
    """The run's final status as the run page's header shows it."""
    status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    status.wait_for(timeout=RUN_TIMEOUT_MS)
    return status.inner_text()


def _filter_logs(page: Page, text: str) -> None:
    page.get_by_placeholder("Filter…").click()
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def _show_markdown(page: Page):
    """Open the (only) Markdown metadata of the filtered log rows; returns its dialog. A long row is
    cut, and its link sits under the row's overflow button: then open the full message first."""
    link = page.get_by_text("[Show Markdown]")
    expect(link).to_be_visible()
    try:
        link.click(trial=True, timeout=3_000)  # only the actionability checks: is it covered?
    except PlaywrightTimeoutError:
        page.get_by_role("button", name="View full message").first.click()
        link = page.get_by_role("dialog").get_by_text("[Show Markdown]")
    link.click()
    return page.get_by_role("dialog").filter(has_text="summary").last


def _connect(port: int, dbname: str = DB) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=dbname, autocommit=True)


# --------------------------------------------------------------------------- tests


def test_lineage_shows_database_backup_restore_test_and_report(ui: Ui, page: Page):
    # the global asset lineage, filtered to everything upstream of the compliance report
    selection = urllib.parse.quote('+key:"dr/compliance_report"', safe="")
    page.goto(f"/asset-groups~{selection}/")
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    # two groups (soundhash, dr) start collapsed: expand them from the graph's settings menu
    page.get_by_role("button", name="settings", exact=True).click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.keyboard.press("Escape")
    chain = ["database", "logical_backup", "restore_test", "compliance_report"]
    nodes = [page.get_by_text(name, exact=True) for name in chain]
    for node in nodes:
        expect(node).to_have_count(1)
        expect(node).to_be_visible()
    # the upstream of the report is this chain and nothing else (no base backup, no WAL archive)
    for other in ("base_backup", "wal_archive", "pitr_test", "snapshot"):
        expect(page.get_by_text(other, exact=True)).to_have_count(0)
    boxes = [node.bounding_box() for node in nodes]
    assert all(boxes), boxes
    xs = [b["x"] for b in boxes if b]
    assert xs == sorted(xs) and len(set(xs)) == 4, f"the lineage is not left to right {chain}: {xs}"
    page.screenshot(path=str(SCREENSHOTS / "lineage.png"))


def test_backup_metadata_plots_and_the_backup_catalog(ui: Ui, page: Page):
    page.goto(f"/assets/{DB}/logical_backup")
    metadata = page.locator("table").filter(has_text="backup_id")
    expect(metadata.get_by_role("row").filter(has_text="backup_id")).to_contain_text(ui.backup_id)
    expect(metadata.get_by_role("row").filter(has_text=re.compile(r"^\s*rows"))).to_contain_text(str(ui.backup_rows))
    page.get_by_role("button", name="Plots").click()
    for key in NUMERIC_METADATA:  # each numeric key plotted across the materializations
        expect(page.get_by_text(key, exact=True)).to_be_visible()
    charts = page.locator("canvas")
    expect(charts).to_have_count(len(NUMERIC_METADATA))
    assert all((charts.nth(i).bounding_box() or {}).get("height", 0) > 50 for i in range(charts.count()))
    page.get_by_text("Metadata", exact=True).scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / "logical_backup.png"), full_page=True)

    # the backup catalog on DB/database, refreshed by the WAL observer (run by the daemon every minute)
    # the catalog is a Markdown table inside the metadata table: the innermost table with its header
    catalog = page.locator("table").filter(has_text="backup id (paste into backup)").last
    deadline = time.monotonic() + 150
    while True:
        page.goto(f"/assets/{DB}/database")
        expect(page.get_by_text("Metadata", exact=True)).to_be_visible()
        try:
            expect(catalog.get_by_role("row").filter(has_text=ui.backup_id)).to_be_visible(timeout=10_000)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    row = catalog.get_by_role("row").filter(has_text=ui.backup_id)
    expect(row).to_contain_text("logical")
    expect(row).to_contain_text("browser-test")  # its label
    expect(catalog.get_by_role("row").filter(has_text="base")).not_to_have_count(0)  # the demo's base backup
    expect(catalog.get_by_role("row").filter(has_text="passed")).not_to_have_count(0)  # the demo's restore test
    page.screenshot(path=str(SCREENSHOTS / "backup_catalog.png"), full_page=True)


def test_restore_database_from_the_launchpad_into_a_new_database(ui: Ui, page: Page):
    target = f"browser_restored_{uuid.uuid4().hex[:8]}"
    run_config = f"ops:\n  choose_backup:\n    config:\n      database: {DB}\n      target_database: {target}\n"
    _launch_from_launchpad(page, "restore_database", run_config, screenshot="launchpad_restore.png")
    assert _run_status(page) == "Success"

    # the restored database holds exactly what the source holds, table by table
    source_rows, restored_rows = ui.pg.row_counts(DB), ui.pg.row_counts(target)
    assert restored_rows == source_rows and sum(source_rows.values()) == ui.backup_rows
    assert ui.pg.table_checksums(target) == ui.pg.table_checksums(DB)

    _filter_logs(page, "RestoreReport")  # the report step's output, with its Markdown summary
    summary = _show_markdown(page)
    expect(summary).to_contain_text(f"restore of {DB} into {target}: PASSED")
    expect(summary).to_contain_text(ui.backup_id)
    expect(summary).to_contain_text(f"{len(source_rows)} tables, {ui.backup_rows} rows")
    expect(summary).to_contain_text("none (the target was new)")
    page.screenshot(path=str(SCREENSHOTS / "restore_run.png"))


def test_point_in_time_recovery_from_the_launchpad_brings_deleted_rows_back(ui: Ui, page: Page):
    """SoundHash's 'Accidental data deletion': a base backup, the time T, a DELETE; recover to T.
    It deletes rows of the source, so it comes after the restore compared with the source."""
    _cli(ui.env, "backup", DB, "--kind", "base")
    with _connect(ui.pg.port) as conn:
        before = conn.execute("SELECT count(*) FROM processing_jobs").fetchone()[0]  # type: ignore[index]
        completed = conn.execute("SELECT count(*) FROM processing_jobs WHERE status = 'completed'").fetchone()[0]  # type: ignore[index]
        time.sleep(1)
        target_time = datetime.now(timezone.utc)
        time.sleep(1)
        deleted = conn.execute("DELETE FROM processing_jobs WHERE status = 'completed'").rowcount
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + 60
        while (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < segment:  # type: ignore[index]
            assert time.monotonic() < deadline, f"WAL {segment} was not archived within 60 s"
            time.sleep(0.2)
    assert deleted == completed > 0

    data_dir = ui.sandbox / "pitr-browser" / "data"
    port = free_port()
    run_config = (
        "ops:\n  recover_to_point:\n    config:\n"
        f"      database: {DB}\n      data_dir: {data_dir}\n      port: {port}\n"
        f"      target_time: '{target_time.isoformat()}'\n"
    )
    try:
        _launch_from_launchpad(page, "point_in_time_recovery", run_config)
        assert _run_status(page) == "Success"
        with _connect(port) as conn:
            assert conn.execute("SELECT count(*) FROM processing_jobs").fetchone()[0] == before  # type: ignore[index]
            back = conn.execute("SELECT count(*) FROM processing_jobs WHERE status = 'completed'").fetchone()[0]  # type: ignore[index]
            assert back == deleted
            assert not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]  # type: ignore[index]
        with _connect(ui.pg.port) as conn:  # the source still lacks them: the recovery went elsewhere
            assert conn.execute("SELECT count(*) FROM processing_jobs").fetchone()[0] == before - deleted  # type: ignore[index]

        _filter_logs(page, "step:validate_recovered")
        summary = _show_markdown(page)
        expect(summary).to_contain_text(f"point-in-time recovery of {DB}: promoted")
        expect(summary).to_contain_text(f"127.0.0.1:{port}")
        page.screenshot(path=str(SCREENSHOTS / "pitr_run.png"))
    finally:
        LocalCluster(data_dir, port).stop("fast")
        shutil.rmtree(data_dir.parent, ignore_errors=True)


def test_a_restore_over_the_live_source_is_refused_and_says_how_to_confirm(ui: Ui, page: Page):
    checksums = ui.pg.table_checksums(DB)
    databases = "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database"
    with _connect(ui.pg.port, "postgres") as conn:
        before = conn.execute(databases).fetchone()[0]  # type: ignore[index]
    run_config = f"ops:\n  choose_backup:\n    config:\n      database: {DB}\n      target_database: {DB}\n"
    _launch_from_launchpad(page, "restore_database", run_config)
    assert _run_status(page) == "Failure"

    _filter_logs(page, "type:STEP_FAILURE")  # the failed step's own row: which step, and why
    expect(page.get_by_text("STEP_FAILURE", exact=True)).to_have_count(1)
    expect(page.get_by_text("choose_backup", exact=True).first).to_be_visible()
    # the refusal names the Launchpad's keys that go ahead (clean, confirm) and says nothing changed
    refusal = (
        f"'{DB}' is the source database '{DB}' itself: restoring over it needs clean: true "
        f"and confirm: '{DB}' (shell: --clean --yes); or restore elsewhere: target_database (shell: --into). Nothing was touched."
    )
    expect(page.get_by_text(refusal).first).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "refused_restore.png"))

    # and nothing was: the source's rows, and no staging or renamed database left behind
    assert ui.pg.table_checksums(DB) == checksums
    with _connect(ui.pg.port, "postgres") as conn:
        assert conn.execute(databases).fetchone()[0] == before  # type: ignore[index]
