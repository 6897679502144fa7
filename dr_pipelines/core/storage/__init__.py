"""Locations: local disk, S3 and GCS behind one protocol (base.py)."""
