"""How the domain layer reports progress: a callable taking one line (print, context.log.info, ...)."""

from collections.abc import Callable

Log = Callable[[str], None]
