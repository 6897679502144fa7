from datetime import timedelta

import pytest

from dr_pipelines.core.config import ConfigError, LocalLocationConfig, load_config, parse_config, parse_duration

MINIMAL = {
    "databases": {"app": {"dbname": "soundhash"}},
    "locations": {"local": {"type": "local", "path": "./backups"}},
}


def test_contract_example_parses(tmp_path):
    text = """
databases:
  app:
    host: 127.0.0.1
    port: 5432
    user: postgres
    password_env: APP_DB_PASSWORD
    dbname: soundhash
    objectives: {rpo: 15m, rto: 1h}
    logical_backup: {schedule: "0 */6 * * *"}
    base_backup: {schedule: "0 2 * * *"}
    pgdata: /var/lib/postgresql/15/main
locations:
  local: {type: local, path: ./backups}
  s3:    {type: s3, bucket: dr-backups, prefix: soundhash-backups/, endpoint_url: null,
          region: us-east-1, storage_class: STANDARD, sse: AES256}
  gcs:   {type: gcs, bucket: dr-backups-eu, prefix: soundhash-backups/, project: my-project}
encryption: {method: age, recipients: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p], identity_file_env: DR_AGE_IDENTITY_FILE}
compression: {method: zstd, level: 3}
retention: {daily_days: 30, weekly_days: 90, monthly_days: 365, min_keep: 3, wal_days: 30}
"""
    path = tmp_path / "dr.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.databases["app"].objectives.rpo == timedelta(minutes=15)
    assert list(cfg.locations) == ["local", "s3", "gcs"]  # order of preference is kept
    # relative paths resolve against the config file, not the current directory
    local = cfg.locations["local"]
    assert isinstance(local, LocalLocationConfig)
    assert local.resolved_path(cfg.base_dir) == tmp_path / "backups"


def test_unknown_key_is_named():
    bad = {**MINIMAL, "databases": {"app": {"dbname": "x", "prot": 5433}}}
    with pytest.raises(ConfigError, match=r"databases\.app\.prot: unknown key"):
        parse_config(bad)


def test_unknown_location_key_is_named_without_union_tag():
    bad = {**MINIMAL, "locations": {"s3": {"type": "s3", "bucket": "b", "buckit": "c"}}}
    with pytest.raises(ConfigError) as e:
        parse_config(bad)
    assert "locations.s3.buckit: unknown key" in str(e.value)


def test_bad_values_are_named():
    bad = {
        **MINIMAL,
        "databases": {"app": {"dbname": "x", "port": 99999, "objectives": {"rpo": "soon"}}},
        "compression": {"method": "lz4"},
    }
    with pytest.raises(ConfigError) as e:
        parse_config(bad)
    text = str(e.value)
    assert "databases.app.port" in text
    assert "databases.app.objectives.rpo: 'soon' is not a duration" in text
    assert "compression.method" in text


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"databases\.app\.dbname: required key is missing"):
        parse_config({**MINIMAL, "databases": {"app": {}}})


def test_missing_password_env_var_is_named(monkeypatch):
    monkeypatch.delenv("NOPE_PASSWORD", raising=False)
    cfg = parse_config({**MINIMAL, "databases": {"app": {"dbname": "x", "password_env": "NOPE_PASSWORD"}}})
    with pytest.raises(ConfigError, match="NOPE_PASSWORD is not set"):
        cfg.databases["app"].libpq_env("app")


def test_identity_in_recipients_is_refused():
    bad = {**MINIMAL, "encryption": {"method": "age", "recipients": ["AGE-SECRET-KEY-1ABC"]}}
    with pytest.raises(ConfigError, match="never put an identity"):
        parse_config(bad)


def test_unreadable_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("databases: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_durations():
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("8h") == timedelta(hours=8)
    assert parse_duration("2d") == timedelta(days=2)
    assert parse_duration(30) == timedelta(seconds=30)
    with pytest.raises(ValueError):
        parse_duration("15 minutes")


def test_sandbox_default(tmp_path, monkeypatch):
    monkeypatch.delenv("DR_PIPELINES_CONFIG", raising=False)
    monkeypatch.setenv("DR_PIPELINES_SANDBOX_DIR", str(tmp_path / "sb"))
    from dr_pipelines.sandbox.config import config_and_file

    cfg, file = config_and_file(None)
    assert cfg.sandbox and file == str(tmp_path / "sb" / "sandbox.yaml")
    assert load_config(file).databases == cfg.databases  # the file PostgreSQL's commands name holds the same
    assert list(cfg.databases) == ["soundhash"]
    assert cfg.encryption.method == "age" and cfg.encryption.recipients[0].startswith("age1")
    identity = cfg.encryption.identity_path()
    assert identity.stat().st_mode & 0o777 == 0o600
    # the same key is reused on the next load
    assert config_and_file(None)[0].encryption.recipients == cfg.encryption.recipients


def test_readme_config_example_is_valid():
    """The README's configuration block is the contract users copy: it must parse as written."""
    import re
    from pathlib import Path

    import yaml

    from dr_pipelines.core.config import parse_config

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## Configuration.*?```yaml\n(.*?)```", readme, re.S).group(1)
    data = yaml.safe_load(
        block.replace("[age1...]", "[age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs3290gq]")
    )
    cfg = parse_config(data, "README.md")
    assert set(cfg.alerts) == {"chat", "pager"} and cfg.checks.size_tolerance == 0.5
    assert cfg.schedules.health_checks == "*/15 * * * *" and cfg.metrics.pushgateway_url


def _load_text(tmp_path, text: str):
    path = tmp_path / "dr.yaml"
    path.write_text(text)
    return load_config(path)


def test_a_key_given_twice_is_refused_not_silently_dropped(tmp_path):
    text = (
        "databases: {app: {dbname: x}}\nlocations:\n  local: {type: local, path: a}\n  local: {type: local, path: b}\n"
    )
    with pytest.raises(ConfigError, match=r"key 'local' appears twice .*line 3"):
        _load_text(tmp_path, text)


@pytest.mark.parametrize(
    "locations",
    [
        "  a: {type: local, path: backups}\n  b: {type: local, path: ./backups/}\n",
        "  a: {type: s3, bucket: x, prefix: p/}\n  b: {type: s3, bucket: x, prefix: p}\n",
        "  a: {type: gcs, bucket: x}\n  b: {type: gcs, bucket: x, prefix: /}\n",
    ],
)
def test_two_names_for_one_place_are_refused(tmp_path, locations):
    with pytest.raises(ConfigError, match="locations.b: the same place as locations.a: one copy, not two"):
        _load_text(tmp_path, "databases: {app: {dbname: x}}\nlocations:\n" + locations)


def test_same_bucket_on_two_services_is_two_places(tmp_path):
    cfg = _load_text(
        tmp_path, "databases: {app: {dbname: x}}\nlocations:\n  a: {type: s3, bucket: x}\n  b: {type: gcs, bucket: x}\n"
    )
    assert list(cfg.locations) == ["a", "b"]


def test_an_invalid_age_recipient_is_refused_at_load(tmp_path):
    text = (
        "databases: {app: {dbname: x}}\nlocations: {a: {type: local, path: a}}\n"
        "encryption: {method: age, recipients: [age1notarealkeyatall]}\n"
    )
    with pytest.raises(ConfigError, match=r"encryption: recipient 'age1notareal'\.\.\. is not a valid age public key"):
        _load_text(tmp_path, text)
