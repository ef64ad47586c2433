"""The live status line of a running search (rich, on a terminal only).

Owns :class:`Display`: generation, best loss (and ppl), evaluations, token-layers and elapsed time on one
line of stderr, refreshed 4 times a second; nothing when stderr is not a terminal (logs get the final
summary line instead) or progress is off (``EVOPRUNE_NO_PROGRESS``).
"""
from __future__ import annotations

import math
import sys
import time

__all__ = ["Display"]


class Display:
    """A one-line live status (generation, best loss, evaluations, token-layers, elapsed) on stderr."""

    def __init__(self, enabled: bool, method: str):
        enabled = enabled and sys.stderr.isatty()
        self.method, self.t0, self.live = method, time.time(), None
        if enabled:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)
            self.live.start()

    def update(self, gen: int, best: float | None, evals: int, tl: int) -> None:
        if not self.live:
            return
        b = f"{best:.4f} (ppl {math.exp(best):.2f})" if best is not None and math.isfinite(best) else "-"
        el = time.time() - self.t0
        self.live.update(f"[bold]{self.method}[/] gen {gen} | best loss {b} | evals {evals} | "
                         f"token-layers {tl:.3g} | {int(el // 60):02d}:{int(el % 60):02d}")

    def close(self) -> None:
        if self.live:
            self.live.stop()
