"""The Dagster layer: typed resources, then one folder per domain; definitions.py assembles them."""
