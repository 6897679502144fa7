"""Health verdicts, metrics, the compliance report and alerts."""
