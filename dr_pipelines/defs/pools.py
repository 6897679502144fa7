"""Pools held from inside a run: a step whose database is a choice of the run's config (a restore
launched from the Launchpad) cannot name its pool in its definition, so it claims the slot itself,
with the storage calls Dagster's executor makes for a definition's `pool=`."""

import time

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


def claim_pool(context: dg.OpExecutionContext, pool: str, claim: str, poll_s: float = 1.0) -> None:
    """Wait for, then hold, a slot of `pool` under the name `claim` (freed by `free_pool`, or with the
    run's slots when it ends)."""
    storage = context.instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    info = storage.get_concurrency_info(pool)
    if info.limit is None:
        return  # no limit for this pool on this instance: nothing to wait for
    if info.using_default_limit and info.slot_count == 0:
        # the instance's default applies but no backup created the pool yet. Only then: on an existing
        # pool this would reset an operator's limit (and on PostgreSQL abort the transaction)
        storage.initialize_concurrency_limit_to_default(pool)
    said = False
    try:
        while not storage.claim_concurrency_slot(pool, context.run_id, claim).is_claimed:
            if not said:
                holders = storage.get_concurrency_info(pool).active_run_ids - {context.run_id}
                context.log.info(
                    f"waiting for pool {pool}: run {', '.join(sorted(holders)) or '(none yet)'} of the same "
                    "database holds it (a backup, a restore test or another restore); this goes on when it ends"
                )
                said = True
            time.sleep(poll_s)
    except BaseException:  # cancelled while waiting: leave no place in the queue behind
        storage.free_concurrency_slot_for_step(context.run_id, claim)
        raise


def free_pool(context: dg.OpExecutionContext | dg.HookContext, claim: str) -> None:
    storage = context.instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        storage.free_concurrency_slot_for_step(context.run_id, claim)
