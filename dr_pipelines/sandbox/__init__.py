"""The embedded sandbox and the demo; nothing in core depends on it."""
