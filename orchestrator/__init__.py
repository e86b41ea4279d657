"""The sweep driver: Ray cluster attach, Optuna search, Parquet results, the `mdsweep` CLI."""
