"""One Moondream2 fine-tuning job: model, weights, data, training loop, evaluation.

This package never imports Ray or Optuna, so a single job runs (and is tested)
without a cluster; the sweep driver in `orchestrator` calls `trainer.job.run_job`.
"""
