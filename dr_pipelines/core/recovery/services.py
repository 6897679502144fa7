"""The system's services (config `services:`): their start order from `after:`, started one after another,
each waiting for its health checks; stopped in reverse order."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.log import Log
from dr_pipelines.core.restore.app_hooks import HookFailed, run_hooks, wait_healthy


@dataclass
class ServiceOutcome:
    name: str
    healthy: bool = False
    seconds: float = 0.0
    checks: list[str] = field(default_factory=list)
    error: str | None = None
    rto_objective_s: float | None = None  # services.X.rto: how long it may take to come back healthy


class ServiceFailed(DrError):
    def __init__(self, message: str, outcomes: list[ServiceOutcome]):
        super().__init__(message)
        self.outcomes = outcomes


def start_order(config: DrConfig, names: list[str] | None = None) -> list[str]:
    """Dependencies first; among services free to start, config order. With `names`, only those (a
    dependency outside them is taken to be running already)."""
    wanted = [n for n in config.services if names is None or n in names]
    done: list[str] = []
    while len(done) < len(wanted):
        ready = [
            n for n in wanted if n not in done and all(d in done or d not in wanted for d in config.services[n].after)
        ]
        done.append(ready[0])  # the config refuses cycles, so one is always ready
    return done


def services_of(config: DrConfig, databases: list[str], file_sets: list[str]) -> list[str]:
    """The services that own any of these databases or file sets, plus those that start after them."""
    owners = {
        n for n, s in config.services.items() if set(s.databases) & set(databases) or set(s.file_sets) & set(file_sets)
    }
    changed = True
    while changed:
        later = {n for n, s in config.services.items() if set(s.after) & owners} - owners
        owners |= later
        changed = bool(later)
    return [n for n in config.services if n in owners]


def start_services(
    config: DrConfig, names: list[str], log: Log, env: dict[str, str] | None = None
) -> list[ServiceOutcome]:
    """Start in dependency order; each must pass its health checks before the next starts. The first
    that does not stops the start there: those before it are left running, and the error says so."""
    outcomes: list[ServiceOutcome] = []
    order = start_order(config, names)
    for i, name in enumerate(order):
        svc = config.services[name]
        outcome = ServiceOutcome(name, rto_objective_s=svc.rto.total_seconds() if svc.rto else None)
        outcomes.append(outcome)
        t0 = time.monotonic()
        try:
            run_hooks(svc.start, svc, f"start {name}", log, env)
            outcome.checks = wait_healthy(svc, log, env)
            outcome.healthy = True
        except HookFailed as e:
            outcome.error = str(e)
            outcome.seconds = round(time.monotonic() - t0, 3)
            running = [o.name for o in outcomes if o.healthy]
            waiting = order[i + 1 :]
            raise ServiceFailed(
                f"service {name!r} did not start healthy: {e}. "
                + (f"Left running: {', '.join(running)}. " if running else "")
                + (f"Not started: {', '.join(waiting)}. " if waiting else "")
                + f"Fix {name!r} (its start command and health checks in services.{name}), then start it and "
                f"the ones after it: dr-pipelines recover services {' '.join([name, *waiting])}",
                outcomes,
            ) from None
        outcome.seconds = round(time.monotonic() - t0, 3)
        log(f"service {name} is healthy ({outcome.seconds:.1f}s)")
    return outcomes


def stop_services(config: DrConfig, names: list[str], log: Log) -> list[str]:
    """Stop in reverse start order (dependants first)."""
    stopped = []
    for name in reversed(start_order(config, names)):
        svc = config.services[name]
        run_hooks(svc.stop, svc, f"stop {name}", log)
        stopped.append(name)
    return stopped
