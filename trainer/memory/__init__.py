"""The GPU cap and peak readings, the per-job memory estimate, precision and optimizers. May import `trainer.model` and the base."""
