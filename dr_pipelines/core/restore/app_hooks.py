"""Application hooks around a restore: stop, start, health checks (commands, HTTP calls, TCP)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from dr_pipelines.core.config import (
    ApplicationHooks,
    CommandHook,
    Hook,
    HttpHook,
    TcpHook,
)
from dr_pipelines.core.errors import DrError


class HookFailed(DrError):
    pass


def describe(hook: Hook) -> str:
    if isinstance(hook, CommandHook):
        return "command " + " ".join(hook.command)
    if isinstance(hook, HttpHook):
        return f"{hook.method} {hook.url}"
    return f"tcp {hook.tcp}"


def run_hook(hook: Hook, timeout: float, env: dict[str, str] | None = None) -> None:
    """Run one hook; raise HookFailed saying what it did and what came back. `env`: added to a command's
    environment (a recovery says where it put the data: DR_RECOVERY_ROOT, DR_DB_<NAME>_PORT, ...)."""
    if isinstance(hook, CommandHook):
        try:
            proc = subprocess.run(
                hook.command,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, **env} if env else None,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise HookFailed(f"{describe(hook)}: {e}") from None
        if proc.returncode != 0:
            raise HookFailed(f"{describe(hook)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    elif isinstance(hook, HttpHook):
        req = urllib.request.Request(hook.url, method=hook.method, data=b"" if hook.method != "GET" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (OSError, ValueError) as e:
            raise HookFailed(f"{describe(hook)}: {e}") from None
        if status != hook.expect_status:
            raise HookFailed(f"{describe(hook)} answered {status}, expected {hook.expect_status}")
    elif isinstance(hook, TcpHook):
        host, _, port = hook.tcp.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                pass
        except OSError as e:
            raise HookFailed(f"{describe(hook)}: {e}") from None


def run_hooks(
    hooks: list[Hook],
    app: ApplicationHooks,
    what: str,
    log: Callable[[str], None],
    env: dict[str, str] | None = None,
) -> list[str]:
    done = []
    for hook in hooks:
        log(f"{what}: {describe(hook)}")
        run_hook(hook, app.timeout.total_seconds(), env)
        done.append(describe(hook))
    return done


def wait_healthy(app: ApplicationHooks, log: Callable[[str], None], env: dict[str, str] | None = None) -> list[str]:
    """Every health check must pass; each is retried (the application may still be starting)."""
    passed = []
    for hook in app.health_checks:
        for attempt in range(1, app.health_retries + 1):
            try:
                run_hook(hook, min(app.timeout.total_seconds(), 10), env)
                passed.append(describe(hook))
                break
            except HookFailed as e:
                if attempt == app.health_retries:
                    raise HookFailed(f"health check failed after {attempt} tries: {e}") from None
                time.sleep(app.health_interval.total_seconds())
    if passed:
        log(f"health checks passed: {', '.join(passed)}")
    return passed
