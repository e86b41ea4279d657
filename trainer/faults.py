"""Deliberate failures (`JobConfig.fault`), so recovery paths are tested end to end.

"oom@N" raises a real `torch.OutOfMemoryError` inside optimizer step N, "nan@N"
makes the loss NaN from step N on, "crash@N" ends the process abruptly at step N
(on a fresh start only, so a retry from a checkpoint can get past it). Part of the trainer's base (torch
only inside `before_step`), so `JobConfig` reads a fault spec with `Fault.parse`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

FAULT_KINDS = ("oom", "nan", "crash")
CRASH_EXIT_CODE = 71


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int

    @classmethod
    def parse(cls, text: Optional[str]) -> Optional["Fault"]:
        if not text:
            return None
        kind, _, step = text.partition("@")
        if kind not in FAULT_KINDS or not step.isdigit():
            raise ValueError(f"fault {text!r} must be KIND@STEP with KIND in {FAULT_KINDS}")
        return cls(kind, int(step))

    def before_step(self, step: int, resumed: bool) -> None:
        """Called as optimizer step `step` (1-based) begins."""
        if step != self.step:
            return
        if self.kind == "oom":
            import torch  # here, not at the top: JobConfig validates fault specs without torch

            raise torch.OutOfMemoryError(f"injected fault oom@{step}")
        if self.kind == "crash" and not resumed:
            os._exit(CRASH_EXIT_CODE)

    def poisons_loss(self, step: int) -> bool:
        return self.kind == "nan" and step >= self.step
