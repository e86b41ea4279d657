"""The sweep driver above one job, in four layers; each imports only the layers under it.

    cli/      the `mdsweep` commands: parse flags, call the layers below, print one line per failure
    sweep/    one sweep: the Ray Tune run, Optuna search, trials, the Parquet sink, locks and repair
    cluster/  attaching to Ray, placing trials on GPUs and memory, storage, signals, the watchdog
    results/  what a sweep leaves on disk, read back: schema, query, statistics, study, report; and the
              terms the sweep shares with its readers: proposals, objectives, search spaces, JobConfig values

`results/` and `cluster/` never import `sweep/` or `cli/`; nothing here is imported by `trainer`.
"""
