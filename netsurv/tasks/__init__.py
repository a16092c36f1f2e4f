"""Task entry points: each ``run(cfg)`` does one stage and returns its results."""
