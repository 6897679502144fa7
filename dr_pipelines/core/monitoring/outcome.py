"""What a health check concludes: one outcome per check and subject (a database, a file set)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ERROR = "error"


WARNING = "warning"


@dataclass
class Outcome:
    database: str
    check: str
    passed: bool
    severity: str  # what a failure means: ERROR (page someone) or WARNING (look at it)
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.passed else self.severity

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status}
