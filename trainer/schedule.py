"""Learning-rate schedule: linear warmup, then cosine decay to zero."""
from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier for `LambdaLR`: warmup avoids the early blow-ups of Adam on a fresh head."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor
