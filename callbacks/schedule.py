"""The one rule of the periodic callbacks (image logger, evaluations): act when ``global_step`` crosses a multiple
of N. Crossing, not ``step % N == 0``: ``global_step`` may stand still over several batches (gradient accumulation)
or move by more than one per batch, and neither may repeat or skip an action."""

from __future__ import annotations


class EveryNSteps:
    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._last_multiple: int | None = None

    def due(self, global_step: int) -> bool:
        """Whether ``global_step`` has crossed a multiple since the last call (0 or negative N: never). The first
        call of a process (a fresh fit or a resumed one) starts counting there: no catch-up."""
        if self.every_n_steps <= 0 or global_step <= 0:
            return False
        multiple = global_step // self.every_n_steps
        if self._last_multiple is None:
            self._last_multiple = (global_step - 1) // self.every_n_steps
        if multiple > self._last_multiple:
            self._last_multiple = multiple
            return True
        return False
