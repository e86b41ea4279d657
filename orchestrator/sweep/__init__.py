"""One sweep from start to end: Tune run, Optuna search, trials, sink, lock, repair. May import `cluster`, `results`, `trainer`."""
