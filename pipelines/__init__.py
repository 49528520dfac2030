"""Beam wiring of curate: one composite PTransform per stage, the job graph, runner options."""
