"""Embedded verifiable tasks that generate `datasets.Dataset` splits."""
