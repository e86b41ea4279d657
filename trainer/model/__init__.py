"""The Moondream2 network, its config, weights, tokenizer and loading. May import the trainer's base only (`job_config`, `budget`, `faults`, `files`)."""
