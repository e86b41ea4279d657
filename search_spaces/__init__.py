"""Optuna define-by-run search spaces, one module each (`space(trial) -> dict`)."""
