"""Samples from files, synthetic captchas, the crop cache and batches. May import `trainer.model` and the base."""
