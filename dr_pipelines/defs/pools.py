"""Pools held from inside a step: a step whose database is a choice of the run's config (a restore
launched from the Launchpad) cannot name its pool in its definition, so it claims the slot itself,
with the same storage calls Dagster's executor uses for a definition's `pool=`."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg


def database_pool(database: str) -> str:
    """The pool every step that reads or replaces this database holds (backups, restore tests, swaps)."""
    return f"pg_{database}"


def database_run_tags(database: str, operation: str, retries: int = 0) -> dict[str, str]:
    """Run tags of the jobs of one database: the production instance queues at most one run per
    `dr/database` (docker/dagster.yaml), and `dagster/max_retries` opts a job into run retries."""
    tags = {"dr/database": database, "dr/operation": operation}
    if retries:
        tags["dagster/max_retries"] = str(retries)
    return tags


@contextmanager
def holding_pool(context: dg.OpExecutionContext, pool: str, poll_s: float = 1.0) -> Iterator[None]:
    storage = context.instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        yield
        return
    storage.initialize_concurrency_limit_to_default(pool)  # a no-op when the pool has a limit already
    if storage.get_concurrency_info(pool).limit is None:
        yield  # no limit for this pool on this instance: nothing to wait for
        return
    claim = f"{context.op_handle}[{pool}]"
    said = False
    while not storage.claim_concurrency_slot(pool, context.run_id, claim).is_claimed:
        if not said:
            holders = storage.get_concurrency_info(pool).active_run_ids - {context.run_id}
            context.log.info(
                f"waiting for pool {pool}: run {', '.join(sorted(holders)) or '(none yet)'} of the same "
                "database holds it (a backup or another restore); this step goes on when it ends"
            )
            said = True
        time.sleep(poll_s)
    try:
        yield
    finally:
        storage.free_concurrency_slot_for_step(context.run_id, claim)
