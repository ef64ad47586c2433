"""Recovery fine-tuning of an in-memory (pruned) model: LoRA merged back into its weights, or full.

Owns :class:`LoRAConfig` and :func:`finetune_lora`. The model of a
:class:`~evoprune.models.LoadedModel` — dense, layer-dropped or width-sliced —
gets peft LoRA adapters on the decoder blocks' attention and MLP projections
(the adapter's q/k/v/o and MLP projections by default: ``q_proj … down_proj``,
OPT's ``q_proj … out_proj, fc1, fc2``), trains them with AdamW on packed token
windows (:func:`~evoprune.finetune.data.pack_windows`), and merges them with
``merge_and_unload``: afterwards ``lm.model`` is the same object with the same
module types and shapes, only its targeted ``nn.Linear`` weights changed, so
every export path (layer-drop, width) and evaluation works on it unchanged.
``mode="full"`` trains those weights themselves instead (no adapters).

The objective (``loss``): ``lm``, the next-token NLL of the windows; ``kd``, the KL divergence from a
:class:`~evoprune.finetune.distill.Teacher`'s (the dense model's) next-token distributions, averaged over
predicted positions; ``kd+lm``, their sum; ``auto``, ``kd+lm`` when a teacher is given, else ``lm``.

Contract of :func:`finetune_lora`:

- in place: no copy of the model is made (``copy.deepcopy(lm.model)`` first to
  keep the original); on an exception the adapters are removed unmerged, so the
  weights are the original ones;
- ``requires_grad`` flags and train/eval mode are restored afterwards;
- deterministic given ``seed`` on CPU (same thread count): LoRA init, dropout
  and the window order (numpy ``default_rng(seed)``: one permutation of all
  windows per epoch) draw from forked, seeded generators; the global torch RNG
  is left untouched;
- training happens where the model lives (its device); on CPU the weights must
  be fp32 (:class:`UserError` otherwise). On CUDA a half-precision model trains
  with fp32 adapters (peft's ``autocast_adapter_dtype``), merged into its dtype.

Learning rate: linear warm-up over ``warmup_steps`` (``lr·(t+1)/warmup``), then
``schedule="linear"`` decays linearly to ``lr/(steps-warmup)`` at the last step,
``"constant"`` keeps ``lr``. Gradients are clipped to ``max_grad_norm``.
"""
from __future__ import annotations

import time
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..models.base import family
from .loop import only_training, train_steps
from .options import LoRAConfig

__all__ = ["LoRAConfig", "finetune_lora", "default_targets", "resolve_targets", "check_targets", "training_windows"]


def default_targets(adapter) -> tuple[str, ...]:
    """The family's attention and MLP projection names (last path component), in block order."""
    return adapter.projection_names()


def check_targets(projections: Sequence[str] | None, target: Sequence[str] | None) -> None:
    """Before the model loads: refuse ``target`` names that are none of the family's block ``projections``
    (:attr:`~evoprune.models.preflight.ModelFacts.projections`; ``None``: family unknown, nothing to check)."""
    if target is None or projections is None:
        return
    missing = [n for n in target if n not in projections]
    if missing:
        raise UserError(f"LoRA --target {', '.join(missing)} matches no projection of this model's blocks "
                        f"(it has {', '.join(projections)})")


def resolve_targets(lm, target: Sequence[str] | None = None) -> list[str]:
    """Full module names of the ``nn.Linear`` layers inside the decoder blocks to adapt.

    A layer matches when its last name component is in ``target`` (default:
    :func:`default_targets`); layers with zero inputs or outputs (the empty
    projections of a fully width-pruned attention) are skipped. Raises
    :class:`UserError` for a name that matches nothing.
    """
    adapter, model = lm.adapter, lm.model
    names = tuple(target) if target is not None else default_targets(adapter)
    prefix = adapter.blocks + "."
    found: list[str] = []
    seen: set[str] = set()
    for full, mod in model.named_modules():
        last = full.rsplit(".", 1)[-1]
        if full.startswith(prefix) and last in names and isinstance(mod, nn.Linear):
            seen.add(last)
            if mod.in_features > 0 and mod.out_features > 0:
                found.append(full)
    missing = [n for n in names if n not in seen]
    if missing:
        raise UserError(f"LoRA target {', '.join(missing)} matches no linear layer in the decoder blocks "
                        f"(this {family(model)} model has {', '.join(default_targets(adapter))})")
    if not found:
        raise UserError("no LoRA target layer has a non-zero width")
    return found


def training_windows(lm, data, seqlen: int) -> torch.Tensor:
    """``[n, seqlen]`` token windows of ``data`` (see :func:`finetune_lora`)."""
    from .data import pack_windows

    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int32, torch.int64) or data.dim() not in (1, 2):
            raise UserError(f"token ids must be a 1-D stream or 2-D windows of integers, got {tuple(data.shape)} "
                            f"{data.dtype}")
        if data.dim() == 2:
            if data.shape[1] != seqlen or data.shape[0] == 0:
                raise UserError(f"token windows have shape {tuple(data.shape)}, expected [n >= 1, seqlen={seqlen}]")
            return data.long().cpu()
        n = data.numel() // seqlen
        if n == 0:
            raise UserError(f"token stream has {data.numel()} tokens, fewer than one window of seqlen {seqlen}")
        return data[: n * seqlen].long().cpu().view(n, seqlen)
    if isinstance(data, str) or (isinstance(data, (list, tuple)) and all(isinstance(d, str) for d in data)):
        return pack_windows(lm.tokenizer, data, seqlen)
    raise UserError(f"training data must be text, a list of documents or a tensor of token ids, "
                    f"got {type(data).__name__}")


def _lr_factor(cfg: LoRAConfig):
    def f(t: int) -> float:
        if t < cfg.warmup_steps:
            return (t + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        return (cfg.steps - t) / (cfg.steps - cfg.warmup_steps)

    return f


def _order(n: int, rng: np.random.Generator):
    """Window indices: one fresh permutation of ``range(n)`` per epoch, forever."""
    while True:
        yield from rng.permutation(n).tolist()


def finetune_lora(lm, data, cfg: LoRAConfig, *, progress: bool = False, teacher=None, checkpoint=None) -> dict:
    """Train LoRA adapters on ``lm.model`` and merge them in, or (``cfg.mode="full"``) the targeted projections
    themselves (see the module docstring for the contract).

    ``data``: a text, a list of documents (packed with ``lm.tokenizer``), a 1-D
    tensor of token ids (cut into windows) or a 2-D ``[n, cfg.seqlen]`` tensor of
    windows. ``teacher``: a :class:`~evoprune.finetune.distill.Teacher` of those windows (``cfg.loss`` ``kd``,
    ``kd+lm``). ``progress``: a tqdm bar on stderr, shown only on a terminal. ``checkpoint``: a
    :class:`~evoprune.finetune.checkpoint.TrainCheckpoint`: training continues from its saved state (if any) and
    saves there as it goes; ``resumed_at`` in the stats is the step it continued from (0: from scratch).

    Returns stats: ``steps``, ``tokens`` (trained tokens, ``steps * batch_size *
    seqlen``), ``windows`` (available), ``epochs`` (passes over them),
    ``loss_first`` / ``loss_last`` (the objective, nats per predicted token, of the first /
    last step's batch, before its update), ``losses`` (every step), ``loss`` (the objective's name),
    ``teacher`` (``live`` / ``top-K cached``, distillation only), ``mode``,
    ``lora_params`` (trained parameters), ``target_modules`` (count), ``wall_s``, ``device``.
    """
    if not isinstance(cfg, LoRAConfig):
        raise TypeError(f"cfg must be a LoRAConfig, got {type(cfg).__name__}")
    if cfg.loss != "auto" and (cfg.loss != "lm") != (teacher is not None):
        raise ValueError(f"--loss {cfg.loss} " + ("needs a teacher" if teacher is None else "takes no teacher"))
    loss = cfg.loss if cfg.loss != "auto" else "lm" if teacher is None else "kd+lm"
    model = lm.model
    first = next(model.parameters())
    device = first.device
    if device.type == "cpu" and any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        raise UserError(f"LoRA training on CPU needs fp32 weights, the model has {first.dtype} (load it with "
                        f"--dtype float32)")
    windows = training_windows(lm, data, cfg.seqlen)
    targets = resolve_targets(lm, cfg.target)
    rng = np.random.default_rng(cfg.seed)
    order = _order(windows.shape[0], rng)
    state = checkpoint.load() if checkpoint is not None else None
    start = 0 if state is None else len(state["losses"])
    for _ in range(start * cfg.batch_size):  # the windows the saved steps trained on
        next(order)

    def batches():
        for _ in range(start, cfg.steps):
            rows = [next(order) for _ in range(cfg.batch_size)]
            yield rows, windows[torch.tensor(rows)].to(device)

    t0 = time.perf_counter()
    fork = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(cfg.seed)
        train = _train_full if cfg.mode == "full" else _train_lora
        losses, n_trained = train(lm, cfg, targets, batches(), _objective(loss, teacher), progress,
                                  _Resume(state, checkpoint, cfg.steps))
    tokens = cfg.steps * cfg.batch_size * cfg.seqlen
    return {
        "steps": cfg.steps,
        "tokens": tokens,
        "windows": int(windows.shape[0]),
        "epochs": tokens / (windows.shape[0] * cfg.seqlen),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "loss": loss,
        **({"teacher": teacher.kind} if teacher is not None else {}),
        "mode": cfg.mode,
        "lora_params": int(n_trained),
        "target_modules": len(targets),
        "wall_s": time.perf_counter() - t0,
        "device": str(device),
        "resumed_at": start,
    }


class _Resume:
    """A training's saved ``state`` (``None``: from scratch) and where it saves (``checkpoint``, or ``None``)."""

    def __init__(self, state: dict | None, checkpoint, steps: int) -> None:
        self.state, self.checkpoint, self.steps = state, checkpoint, steps

    def begin(self, named: dict) -> None:
        """Put the saved trained tensors and random state back (after the adapters were made)."""
        if self.state is not None:
            self.checkpoint.restore(self.state, named)

    def on_step(self, named: dict):
        if self.checkpoint is None:
            return None
        return lambda opt, sched, losses: self.checkpoint.save(named, opt, sched, losses, self.steps)


def _objective(name: str, teacher):
    """``loss_fn(model, (rows, ids))`` of :func:`~evoprune.finetune.loop.train_steps` for the objective ``name``."""
    from ..fitness.kl import kl_divergence

    def loss_fn(model, batch):
        rows, ids = batch
        if name == "lm":
            return model(input_ids=ids, labels=ids, use_cache=False).loss
        logits = model(input_ids=ids, use_cache=False).logits
        positions = ids.shape[0] * (ids.shape[1] - 1)
        loss = (kl_divergence(teacher.targets(rows, ids), logits) / positions).float()
        if name == "kd+lm":
            v = logits.shape[-1]
            loss = loss + nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))
        return loss

    return loss_fn


def _train_lora(lm, cfg: LoRAConfig, targets: list[str], batches, loss_fn, progress: bool,
                resume: _Resume) -> tuple[list, int]:
    """LoRA adapters on ``targets``, trained and merged into ``lm.model`` (unmerged and dropped on failure)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = lm.model
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    peft_model = None
    merged = None
    try:
        peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                  target_modules=targets, bias="none")
        with warnings.catch_warnings():  # transformers' own deprecation notices, reached through peft
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, peft_cfg)
        named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        params = list(named.values())
        n_lora = sum(p.numel() for p in params)
        resume.begin(named)
        peft_model.train()
        losses = train_steps(peft_model, params, batches, cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             max_grad_norm=cfg.max_grad_norm, lr_factor=_lr_factor(cfg), what="LoRA training",
                             hint="lower --lr", progress=progress, loss_fn=loss_fn, resume=resume.state,
                             on_step=resume.on_step(named))
        del named
        del params
        with torch.no_grad():
            merged = peft_model.merge_and_unload()
    finally:
        if merged is None and peft_model is not None:
            peft_model.unload()  # failed: drop the adapters unmerged, weights as before
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if merged is not model:  # peft edits the model in place; keep lm consistent should that ever change
        lm.model = merged
        merged.train(was_training)
    return losses, n_lora


def _train_full(lm, cfg: LoRAConfig, targets: list[str], batches, loss_fn, progress: bool,
                resume: _Resume) -> tuple[list, int]:
    """AdamW on the weights of ``targets`` themselves (everything else frozen); on failure the weights are put
    back as they were."""
    model = lm.model
    names = set(targets)
    named = {f"{n}.weight": m.weight for n, m in model.named_modules() if n in names}
    params = list(named.values())
    saved = [p.detach().clone() for p in params]
    try:
        resume.begin(named)
        with only_training(model, params):
            losses = train_steps(model, params, batches, cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 max_grad_norm=cfg.max_grad_norm, lr_factor=_lr_factor(cfg), what="full training",
                                 hint="lower --lr", progress=progress, loss_fn=loss_fn, resume=resume.state,
                                 on_step=resume.on_step(named))
    except BaseException:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        raise
    return losses, sum(p.numel() for p in params)
