"""Per-row scores: IFD / r-IFD with a weak LM (``ifd``); more scorers to come (LESS, text statistics)."""
