"""Duplicate removal: exact (normalized-text hash) and, in later stages, near and semantic."""
