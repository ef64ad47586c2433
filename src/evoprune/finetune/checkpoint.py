"""Resumable recovery training: the state of a fine-tune, saved atomically while it trains.

Owns :class:`TrainCheckpoint` and :data:`CHECKPOINT_S`. A checkpoint holds what the next step depends on: the
trained tensors (LoRA adapters, or the projections themselves in full mode), AdamW's and the schedule's state,
the losses so far (their count is the step), and torch's random state (dropout). Data order comes from the
seed and the step, and a teacher's targets are a function of the windows, so neither is stored. Started again
with the same ``identity`` (the arguments that determine the result), training continues at the saved step and
ends exactly as the uninterrupted run (same losses, same weights: ``tests/test_finetune_resume.py``); a
checkpoint of other arguments is refused. Written with :func:`~evoprune.files.atomic_open` (a kill -9 mid-write
leaves the previous one), at most every :data:`CHECKPOINT_S` seconds and after the last step; removed once the
export is written.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_open

__all__ = ["TrainCheckpoint", "CHECKPOINT_S", "CHECKPOINT_FILE", "holds_unfinished"]

CHECKPOINT_FILE = "finetune-checkpoint.pt"
# seconds between checkpoints: the cost of a save (LoRA: a few MB) stays far below the training it protects;
# EVOPRUNE_CHECKPOINT_S overrides it (tests: 0, every step)
CHECKPOINT_S = float(os.environ.get("EVOPRUNE_CHECKPOINT_S", "60") or 60)


def _is_partial(name: str) -> bool:
    """Whether ``name`` is the temporary of a checkpoint save (:func:`~evoprune.files.atomic_open`'s sibling)."""
    return name.startswith(f".{CHECKPOINT_FILE}.")


def holds_unfinished(out: Path) -> bool:
    """Whether directory ``out`` holds an unfinished fine-tune and nothing else: its checkpoint, and perhaps the
    temporary of a save that a kill cut short."""
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    return CHECKPOINT_FILE in names and all(n == CHECKPOINT_FILE or _is_partial(n) for n in names)


class TrainCheckpoint:
    """``path``'s checkpoint of the training described by ``identity`` (a JSON-able dict)."""

    def __init__(self, path, identity: dict, every_s: float = CHECKPOINT_S) -> None:
        self.path, self.identity, self.every_s = Path(path), identity, float(every_s)
        self._last = time.monotonic()

    def load(self) -> dict | None:
        """The saved state (``None``: none saved); :class:`UserError` when it is another training's."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("identity") != self.identity:
            diff = sorted(k for k in set(self.identity) | set(state.get("identity", {}))
                          if self.identity.get(k) != state.get("identity", {}).get(k))
            raise UserError(f"{self.path.parent} holds an unfinished fine-tune with other arguments "
                            f"({', '.join(diff)}); use --overwrite or a new --out")
        return state

    def save(self, named: dict, opt, sched, losses: list[float], steps: int) -> None:
        """Save after a completed step when :data:`CHECKPOINT_S` passed since the last save, or at the last step."""
        if len(losses) < steps and time.monotonic() - self._last < self.every_s:
            return
        state = {"identity": self.identity, "losses": list(losses),
                 "trainable": {k: v.detach().cpu().clone() for k, v in named.items()},
                 "optimizer": opt.state_dict(), "scheduler": None if sched is None else sched.state_dict(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        with atomic_open(self.path, "wb") as f:
            torch.save(state, f)
        self._last = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def remove_partial(self) -> None:
        """Remove the temporary of a save that a kill cut short (by the directory's one writer)."""
        for tmp in self.path.parent.iterdir():
            if _is_partial(tmp.name):
                tmp.unlink(missing_ok=True)

    @staticmethod
    def restore(state: dict, named: dict) -> None:
        """Put the saved tensors into ``named`` (name -> parameter) and torch's random state back."""
        missing = set(state["trainable"]) ^ set(named)
        if missing:
            raise UserError(f"the fine-tune checkpoint does not match the model's trained tensors "
                            f"({', '.join(sorted(missing)[:3])}...); use --overwrite")
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(state["trainable"][k].to(p.device, p.dtype))
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
