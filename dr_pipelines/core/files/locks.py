"""Why pack collection never deletes a pack a snapshot in progress may use.

A snapshot reuses packs it finds in the repository; retention deletes packs no retained snapshot
refers to. A snapshot being written refers to packs no committed snapshot shows yet, so the two
must not overlap on a location. Each announces itself before it looks, and then looks for the
other (the order is what makes it safe, as with two flags in a mutual exclusion):

- a snapshot writes `_files/locks/snapshot-<owner>.json` on every location, then checks for a live
  `gc-` lock there (if one is found it waits, then fails: "try again");
- a pack collection writes `_files/locks/gc-<owner>.json` on the location, then checks for a live
  `snapshot-` lock there (if one is found it deletes no pack there this time).

Both orders write before they read, so at least one of any two that overlap sees the other.
Locations are strongly consistent for a write followed by a list (local disk, S3, GCS). A lock
whose process is dead (on this host) is stale and removed; another host's lock counts as live for
`sweep.GRACE` (6 h), a snapshot or collection running longer than that being unheard of.
Besides, a snapshot checks right before it commits that every pack it refers to is on every
location (copying a missing one from another), and fails if one is gone everywhere.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from dr_pipelines.core.errors import DrError
from dr_pipelines.core.files.format import ROOT
from dr_pipelines.core.log import Log
from dr_pipelines.core.owner import owner_dead, owner_tag
from dr_pipelines.core.storage.base import Location, LocationError, ObjectNotFound

LOCKS = f"{ROOT}/locks/"


class LockedOut(DrError):
    pass


@dataclass
class LockInfo:
    key: str
    kind: str
    owner: str
    started: datetime


def _key(kind: str, owner: str) -> str:
    return f"{LOCKS}{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', owner)}.json"


def live_locks(location: Location, kind: str, log: Log = lambda m: None) -> list[LockInfo]:
    """Locks of `kind` on the location whose owner may still be at work; stale ones are removed."""
    from dr_pipelines.core.sweep import GRACE

    out = []
    for obj in location.list(LOCKS):
        name = obj.key.rsplit("/", 1)[1]
        if not name.startswith(kind + "-"):
            continue
        try:
            data = json.loads(location.get_bytes(obj.key))
            info = LockInfo(obj.key, kind, data["owner"], datetime.fromisoformat(data["started_at"]))
        except (ObjectNotFound, ValueError, KeyError):
            continue
        dead = owner_dead(info.owner)
        if dead or (dead is None and datetime.now(timezone.utc) - info.started > GRACE):
            try:
                location.delete(obj.key)
                log(f"removed the stale {kind} lock of {info.owner} on {location.name}")
            except LocationError:
                pass
            continue
        if info.owner != owner_tag():
            out.append(info)
    return out


class Lock:
    """This process's lock of `kind` on some locations; released on exit, even on failure."""

    def __init__(self, kind: str, locations: dict[str, Location]):
        self.kind = kind
        self.owner = owner_tag()
        self.key = _key(kind, self.owner)
        self.held: dict[str, Location] = {}
        self.refused: dict[str, str] = {}  # locations that could not take it, and why
        for name, loc in locations.items():
            try:
                loc.put_bytes(self.key, self._body())
                self.held[name] = loc
            except LocationError as e:
                self.refused[name] = str(e)  # it cannot take the snapshot's objects either
        self._refreshed = time.monotonic()

    def _body(self) -> bytes:
        # started_at is when it was last written: another host's lock counts as live for GRACE after it
        return json.dumps({"owner": self.owner, "started_at": datetime.now(timezone.utc).isoformat()}).encode()

    def refresh(self, every: float = 60.0) -> None:
        """Write it again (at most once a minute), so a long run's lock never looks stale."""
        if time.monotonic() - self._refreshed < every:
            return
        self._refreshed = time.monotonic()
        for loc in self.held.values():
            try:
                loc.put_bytes(self.key, self._body())
            except LocationError:
                pass

    def release(self) -> None:
        for loc in self.held.values():
            try:
                loc.delete(self.key)
            except LocationError:
                pass  # stale once this process is gone

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def wait_for_no_gc(lock: Lock, log: Log, timeout: float = 60.0) -> None:
    """After taking a snapshot lock: wait while a pack collection runs on one of its locations."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        busy = []
        for name, loc in lock.held.items():
            try:
                busy += [f"{name} (by {g.owner})" for g in live_locks(loc, "gc", log)]
            except LocationError:
                continue
        if not busy:
            return
        if time.monotonic() > deadline:
            raise LockedOut(
                f"a pack collection (retention) is running on {', '.join(busy)}; the snapshot did not start. "
                "Run it again once retention has finished"
            )
        if not said:
            log(f"waiting for the pack collection on {', '.join(busy)} to finish")
            said = True
        time.sleep(1)
