"""The `dr-pipelines` command.

Imports are deferred into each command: `wal-push` / `wal-fetch` run once per WAL segment and must
not pay for dagster, boto3 or pandas they don't use.
"""
