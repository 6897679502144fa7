"""Alerts: one notification per incident, a resolved notice when it clears, retried until delivered.

An `IncidentBook` remembers open incidents and what each channel has been told; it serializes to a
small JSON string (a sensor's cursor). Callers `observe()` conditions each tick; `deliver()` sends
only what a channel has not yet received, so a tick that finds the same failure again sends
nothing, and a channel that was down gets the message on a later tick.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from dr_pipelines.core.config import (
    ConfigError,
    DrConfig,
    PagerDutyAlertConfig,
    WebhookAlertConfig,
    _read_env,
)
from dr_pipelines.core.errors import DrError

TRIGGER = "trigger"


RESOLVE = "resolve"


@dataclass(frozen=True)
class Alert:
    key: str  # identifies the incident: "run:<job>", "check:<asset>:<check>", "stale:<db>"
    title: str  # what failed
    detail: str
    source: str  # where: database, location, job
    since: str  # ISO time the failure began
    url: str  # the Dagster UI page to open
    severity: str = "error"  # error | warning


class Channel(Protocol):
    name: str

    def send(self, action: str, alert: Alert) -> None: ...


class DeliveryError(DrError):
    pass


def _session(retries: int) -> requests.Session:
    # urllib3 retries connection errors and 429/5xx with backoff; POST is retried too (the
    # receivers deduplicate: PagerDuty by dedup_key, chat hooks at worst post twice).
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        backoff_factor=0.2,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None,
        raise_on_status=False,
    )
    s = requests.Session()
    s.mount("http://", HTTPAdapter(max_retries=retry))
    s.mount("https://", HTTPAdapter(max_retries=retry))
    return s


def _post(name: str, url: str, payload: dict, retries: int, timeout: float) -> None:
    try:
        r = _session(retries).post(url, json=payload, timeout=timeout)
    except requests.RequestException as e:
        raise DeliveryError(
            f"alert channel {name}: cannot reach the receiver ({type(e).__name__}); will retry on the next tick"
        ) from None
    if r.status_code >= 300:
        raise DeliveryError(f"alert channel {name}: receiver answered HTTP {r.status_code}: {r.text[:200]}")


def message_text(action: str, alert: Alert) -> str:
    if action == RESOLVE:
        return f"RESOLVED: {alert.title} ({alert.source}, failing since {alert.since}). {alert.url}"
    return f"{alert.severity.upper()}: {alert.title}\nWhere: {alert.source}\nSince: {alert.since}\n{alert.detail}\n{alert.url}"


@dataclass
class WebhookChannel:
    name: str
    url: str
    format: str = "slack"
    retries: int = 2
    timeout: float = 5

    def payload(self, action: str, alert: Alert) -> dict:
        text = message_text(action, alert)
        if self.format == "slack":
            return {"text": text}
        if self.format == "discord":
            return {"content": text[:2000]}
        return {"event": action, "text": text, **asdict(alert)}

    def send(self, action: str, alert: Alert) -> None:
        _post(self.name, self.url, self.payload(action, alert), self.retries, self.timeout)


@dataclass
class PagerDutyChannel:
    """Events API v2: `dedup_key` ties the trigger and the resolve to one PagerDuty incident."""

    name: str
    routing_key: str
    url: str
    retries: int = 2
    timeout: float = 5

    def payload(self, action: str, alert: Alert) -> dict:
        body: dict[str, object] = {
            "routing_key": self.routing_key,
            "event_action": action,
            "dedup_key": f"dr_pipelines:{alert.key}",
        }
        if action == TRIGGER:
            body["payload"] = {
                "summary": alert.title[:1024],
                "source": alert.source,
                "severity": "critical" if alert.severity == "error" else "warning",
                "timestamp": alert.since,
                "custom_details": {"detail": alert.detail},
            }
            body["links"] = [{"href": alert.url, "text": "Dagster UI"}]
        return body

    def send(self, action: str, alert: Alert) -> None:
        _post(self.name, self.url, self.payload(action, alert), self.retries, self.timeout)


def channels_from_config(config: DrConfig) -> tuple[list[Channel], list[str]]:
    """The usable channels, and why the others are not (secrets come from environment variables;
    one missing variable must not silence the other channels)."""
    out: list[Channel] = []
    broken: list[str] = []
    for name, a in config.alerts.items():
        try:
            if isinstance(a, WebhookAlertConfig):
                out.append(WebhookChannel(name, _read_env(a.url_env, f"alerts.{name}.url_env"), a.format))
            elif isinstance(a, PagerDutyAlertConfig):
                out.append(
                    PagerDutyChannel(name, _read_env(a.routing_key_env, f"alerts.{name}.routing_key_env"), a.url)
                )
        except ConfigError as e:
            broken.append(str(e))
    return out, broken


class IncidentBook:
    """Open incidents and, per channel, the last action delivered ("trigger" or "resolve")."""

    def __init__(self, state: str | None = None):
        data = json.loads(state) if state else {}
        self.incidents: dict[str, dict] = data.get("incidents", {})
        self.extra: dict = data.get("extra", {})  # the sensor's own bookmark (e.g. last run seen)

    def to_json(self) -> str:
        return json.dumps({"incidents": self.incidents, "extra": self.extra}, sort_keys=True)

    def observe(self, key: str, alert: Alert | None) -> None:
        """`alert` when the condition is failing now, None when it is healthy."""
        inc = self.incidents.get(key)
        if alert is not None:
            if inc is None:
                self.incidents[key] = {"alert": asdict(alert), "open": True, "sent": {}}
            else:
                inc["open"] = True  # still failing (or failing again before the resolve went out)
        elif inc is not None:
            inc["open"] = False

    def open_keys(self) -> set[str]:
        return {k for k, v in self.incidents.items() if v["open"]}

    def deliver(
        self, channels: list[Channel], log: Callable[[str], None] = lambda m: None, expected: list[str] | None = None
    ) -> list[str]:
        """Send what each channel still lacks; returns delivery errors (left pending for the next tick).
        A cleared incident is forgotten only when every `expected` channel (default: those given)
        has delivered its resolve, so an unusable channel still hears of it later."""
        expected = [ch.name for ch in channels] if expected is None else expected
        errors = []
        down: set[str] = set()  # a channel that failed this tick is not tried again until the next
        for key, inc in list(self.incidents.items()):
            alert = Alert(**inc["alert"])
            for ch in channels:
                if ch.name in down:
                    continue
                sent = inc["sent"].get(ch.name)
                if inc["open"]:
                    todo = [] if sent == TRIGGER else [TRIGGER]
                else:  # cleared: a channel never told of it hears both (it failed between ticks)
                    todo = {None: [TRIGGER, RESOLVE], TRIGGER: [RESOLVE], RESOLVE: []}[sent]
                for action in todo:
                    try:
                        ch.send(action, alert)
                    except DeliveryError as e:
                        errors.append(str(e))
                        log(str(e))
                        down.add(ch.name)
                        break
                    inc["sent"][ch.name] = action
                    log(f"alert {action} sent to {ch.name}: {alert.title}")
            if not inc["open"] and all(inc["sent"].get(name) == RESOLVE for name in expected):
                del self.incidents[key]
        return errors


def notify(config: DrConfig, title: str, detail: str, source: str, log, severity: str = "info") -> list[str]:
    """A notice to every channel (the runbooks' "stakeholders notified": a recovery started, ended). An
    informational notice never pages: PagerDuty gets only failures. Returns the channels reached."""
    from datetime import datetime, timezone

    channels, broken = channels_from_config(config)
    for why in broken:
        log(f"warning: {why}")
    alert = Alert(
        key=f"notice:{source}",
        title=title,
        detail=detail,
        source=source,
        since=datetime.now(timezone.utc).isoformat(),
        url=config.webserver_url,
        severity=severity,
    )
    reached = []
    for channel in channels:
        if severity == "info" and isinstance(channel, PagerDutyChannel):
            continue
        try:
            channel.send(TRIGGER, alert)
            reached.append(channel.name)
        except DeliveryError as e:
            log(f"warning: {e}")
    return reached
