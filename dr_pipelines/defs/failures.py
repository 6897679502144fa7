"""Domain errors become `dg.Failure` with the domain's own message, so the UI and alerts show
what happened and what to do rather than a wrapped stack trace."""

from contextlib import contextmanager

import dagster as dg

from dr_pipelines.core.errors import exit_code_for


@contextmanager
def domain_failures(metadata: dict | None = None):
    try:
        yield
    except dg.Failure:
        raise
    except Exception as e:
        code = exit_code_for(e)
        if code is None:
            raise  # a bug, not an operational failure: keep Dagster's full stack trace
        # the exit code travels with it, so the shell exits as it would had it run the step itself
        failure = dg.Failure(description=str(e), metadata={**(metadata or {}), "exit_code": code})
        failure.domain_error = e  # type: ignore[attr-defined]
        # not chained: the UI would print the message three times, the last under the domain error's trace
        raise failure from None


def domain_error(failure: dg.Failure) -> Exception | None:
    """The domain error a `domain_failures` block turned into this failure (e.g. a partial backup)."""
    return getattr(failure, "domain_error", None)


def partial_failure(failure: dg.Failure, made_key: str, made_id: str, committed: list[str], failed) -> dg.Failure:
    """A run that stored its backup (or snapshot) on some locations but not all: say which."""
    return dg.Failure(
        description=failure.description,
        metadata={
            **failure.metadata,
            made_key: dg.MetadataValue.text(made_id),
            "stored_on": dg.MetadataValue.text(", ".join(committed)),
            "failed_on": dg.MetadataValue.text(", ".join(failed)),
        },
    )
