"""Compression and encryption, behind one table (methods.py): encode, decode, keys.

Every object decodes with standard tools: ``age -d``, ``zstd -d`` / ``gunzip``."""
