"""curate: turn a large, noisy instruction-tuning pool into a small, deduplicated, selected set."""
__version__ = "0.1.0"
