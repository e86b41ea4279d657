"""The Moondream2 network, its config, weights, tokenizer and loading. May import `trainer.job_config` and `trainer.files` only."""
