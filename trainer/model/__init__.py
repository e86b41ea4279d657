"""The Moondream2 network, its config, weights, tokenizer and loading.

It owns its choices (`choices`: attention modes, scopes, dtypes, prompts), which the job's contract imports. It may
import the trainer's torch-free base (`budget`, `faults`, `files`), never the contract (`job_config`) or anything
above it."""
