"""Experiment trackers: each trial of a sweep mirrored as one run in the tracker a team already uses (`--log-to`).

The Parquet results stay the sweep's record; a tracker gets a copy as the sweep goes, through a Ray Tune callback
per tracker. May import `orchestrator.results` (the rows' vocabulary) and `trainer` (the metrics' names), never the
sweep that uses it.
"""
