"""The resident archiver's side of recovery (pgBackRest's asynchronous archive-get, in our terms):
while a cluster replays, keep the next segments after the newest one PostgreSQL asked for in its
spool, so that fetching overlaps replay instead of halting it every `wal.prefetch` segments.

- PostgreSQL takes a spooled segment with a rename (`fast_path.take_prefetched`), never telling
  the agent; a spooled file that disappears is how the prefetcher sees replay move on.
- A segment the archive does not hold (yet) is asked for again after `RETRY_MISSING_S`, not in a
  loop: at the end of the archive, PostgreSQL's own call gets "not found" and decides.
- It works only while the cluster is in recovery (`recovery.signal` or `standby.signal`); once
  promoted, whatever is left in the spool is removed.
- Best effort throughout: a segment it fails to spool is fetched by PostgreSQL's own call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dr_pipelines.core.durable import write_atomically
from dr_pipelines.core.postgres.wal_names import SEGMENT, parse_segment, segment_name
from dr_pipelines.core.wal.fast_path import SPOOL

RETRY_MISSING_S = 2.0
WORKERS = 4


def in_recovery(data_dir: Path) -> bool:
    return (data_dir / "recovery.signal").exists() or (data_dir / "standby.signal").exists()


class Prefetcher:
    """`fetch(name, locations)` returns the segment's verified bytes, None if no location holds it,
    or raises; `on_work()` is called for every segment spooled (the agent is not idle meanwhile)."""

    def __init__(
        self,
        pg_wal: str,
        count: int,
        fetch: Callable[[str, list[str] | None], bytes | None],
        log: Callable[[str], None],
        on_work: Callable[[], None] = lambda: None,
    ):
        self.spool = Path(pg_wal) / SPOOL
        self.data_dir = Path(pg_wal).parent
        self.count, self.fetch, self.log, self.on_work = count, fetch, log, on_work
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.position: tuple[int, int] | None = None  # (timeline, number) of the newest segment asked for
        self.segment_size = 0
        self.locations: list[str] | None = None
        self.spooled: set[tuple[int, int]] = set()  # written by us, not yet taken
        self.in_flight: set[tuple[int, int]] = set()
        self.missing: dict[tuple[int, int], float] = {}  # not in the archive at this monotonic time
        self.thread: threading.Thread | None = None
        self.counts = {"spooled": 0, "taken": 0}

    def asked(self, name: str, segment_size: int, locations: list[str] | None) -> None:
        """PostgreSQL asked for `name` (served by the agent): spool the segments after it."""
        if self.count <= 0 or not SEGMENT.match(name) or segment_size <= 0:
            return
        position = parse_segment(name, segment_size)
        with self.lock:
            if self.position is None or position[0] != self.position[0] or position[1] > self.position[1]:
                self.position, self.segment_size, self.locations = position, segment_size, locations
            self.missing = {}  # asked again: the archive may have grown
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="wal-prefetch", daemon=True)
                self.thread.start()
        self.wake.set()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()

    def status(self) -> dict:
        with self.lock:
            return {**self.counts, "spooled_now": len(self.spooled)}

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="wal-prefetch") as pool:
            while not self.stopped.is_set():
                self.wake.wait(0.1)
                self.wake.clear()
                if not in_recovery(self.data_dir):
                    self._forget_spooled()
                    continue
                for key, name in self._wanted():
                    pool.submit(self._spool_one, key, name)

    def _wanted(self) -> list[tuple[tuple[int, int], str]]:
        """The segments of the window not spooled, not being fetched and not known missing; drops
        from `spooled` what replay has taken (and any spooled file behind the window)."""
        with self.lock:
            if self.position is None:
                return []
            tli, frontier = self.position
            taken = {k for k in self.spooled if not (self.spool / segment_name(*k, self.segment_size)).exists()}
            self.counts["taken"] += len(taken)
            self.spooled -= taken
            frontier = max([frontier] + [n for t, n in taken if t == tli])
            self.position = (tli, frontier)
            for stale in [k for k in self.spooled if k[0] != tli or k[1] <= frontier]:
                self._remove(stale)
            now = time.monotonic()
            wanted = []
            for number in range(frontier + 1, frontier + 1 + self.count):
                key = (tli, number)
                if key in self.spooled or key in self.in_flight:
                    continue
                if now - self.missing.get(key, -RETRY_MISSING_S) < RETRY_MISSING_S:
                    break  # nothing after a missing segment either: the archive ends there for now
                self.in_flight.add(key)
                wanted.append((key, segment_name(tli, number, self.segment_size)))
            return wanted

    def _spool_one(self, key: tuple[int, int], name: str) -> None:
        try:
            data = self.fetch(name, self.locations)
            if data is not None:
                self.spool.mkdir(exist_ok=True)
                write_atomically(self.spool / name, data)
                self.on_work()
                if not in_recovery(self.data_dir):  # promoted while it was fetched: never taken
                    (self.spool / name).unlink(missing_ok=True)
                    data = None
        except Exception as e:  # PostgreSQL's own call fetches it, and says what is wrong
            self.log(f"warning: prefetching {name} failed ({type(e).__name__}: {e})")
            data = None
        with self.lock:
            self.in_flight.discard(key)
            if data is None:
                self.missing[key] = time.monotonic()
            else:
                self.spooled.add(key)
                self.counts["spooled"] += 1
        self.wake.set()

    def _remove(self, key: tuple[int, int]) -> None:
        """Under the lock: a spooled segment replay will not take."""
        self.spooled.discard(key)
        try:
            (self.spool / segment_name(*key, self.segment_size)).unlink()
        except FileNotFoundError:
            pass

    def _forget_spooled(self) -> None:
        """Recovery has ended: nothing spooled will be taken, by anyone (the command's own
        prefetches and files no client came for included)."""
        with self.lock:
            self.spooled.clear()
            self.position = None
            try:
                leftovers = list(self.spool.iterdir())
            except FileNotFoundError:
                return
            for path in leftovers:
                path.unlink(missing_ok=True)
