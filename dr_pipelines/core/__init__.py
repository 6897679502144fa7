"""The domain layer: plain Python, never imports dagster or the sandbox."""
