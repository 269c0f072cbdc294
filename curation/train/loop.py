"""The platform's training loop: any strategy, streaming batches, matched samples seen.

:func:`run_training` knows nothing about the objective: it asks the
:class:`~curation.train.strategies.Strategy` for the model options, the extra modules and the
loss of each batch. Batches come from a :class:`~curation.train.data.PairSource` (shards
streamed from disk, or pairs in memory) and are decoded and preprocessed one at a time.

Training is seeded and deterministic on one device: the model init uses ``torch.manual_seed``,
the data order and augmentations an explicit ``torch.Generator``. AdamW (no weight decay on
gains, biases, embeddings and the temperature) with linear warmup and cosine decay; the
compute spec's device and precision apply (``bf16`` autocast; ``fp16`` with a gradient scaler,
CUDA only).

Measured cost on the project machine (2 shared CPU cores, fp32, batch 128, 72x72 emoji;
steady-state samples/s): tiny-vit-p8-32 clip ~650 (2 threads) / ~400 (1 thread, loaded);
flip ~820 / ~475; clip_da ~735 / ~375; slip ~310 / ~220; tiny-rn-32 clip ~660 / ~400.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curation.engine.compute import ComputeSpec
from curation.engine.progress import report
from curation.train.config import (
    TrainConfig,
    batch_sizes,
    cosine_lr,
    plan_steps,
    warmup_steps,
)
from curation.train.data import (
    MemoryPairs,
    PairSource,
    ShardPairs,
    batch_stream,
    collate,
)
from curation.train.strategies import (
    Batch,
    _open_clip,
    build_model,
    make_strategy,
    param_groups,
)

log = logging.getLogger(__name__)


def adamw(params, *args, optim_module=None, **kw):
    """AdamW on the fused kernel where the device and dtype support it, else torch's default
    implementation; an explicit ``fused`` or ``foreach`` is passed through untouched.

    Both training backends build their optimizer with it (the platform loop directly,
    open_clip_train through :mod:`curation.train.open_clip_entry`); ``optim_module``: the
    ``torch.optim`` module to build from (default ``torch.optim``)."""
    optim = optim_module or torch.optim
    if "fused" in kw or "foreach" in kw:
        return optim.AdamW(params, *args, **kw)
    params = list(params)  # the fallback needs them again
    try:
        return optim.AdamW(params, *args, fused=True, **kw)
    except (RuntimeError, TypeError):  # fused kernel unavailable for this device / dtype
        return optim.AdamW(params, *args, **kw)


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        model: the trained open_clip model (eval mode, on the training device).
        config: the training config.
        steps: optimizer steps taken.
        batch_size: pairs per step actually used.
        samples_seen: exactly ``config.samples_seen`` (the last batches trimmed, :func:`batch_sizes`).
        n_train: distinct pairs in the training set.
        seconds: wall time of the training loop (excluding data decoding).
        samples_per_s: ``samples_seen / seconds``.
        history: one dict per ``log_every`` steps and the last step, with keys ``step``,
            ``samples_seen``, ``epoch``, ``loss``, ``clip_loss``, ``ssl_loss``, ``lr``,
            ``logit_scale``, ``samples_per_s``, ``elapsed_s``.
    """

    model: nn.Module
    config: TrainConfig
    steps: int
    batch_size: int
    samples_seen: int
    n_train: int
    seconds: float
    samples_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return float(self.history[-1]["loss"]) if self.history else float("nan")


def run_training(
    source: PairSource, config: TrainConfig, compute: ComputeSpec | None = None, progress=None
) -> TrainResult:
    """Train an open_clip model with ``config.strategy`` on ``source`` at matched samples seen.

    Args:
        source: the pairs (:class:`~curation.train.data.ShardPairs` streams them from shards).
        config: the run (model, strategy, samples seen, optimizer, seed, ...).
        compute: device and precision.
        progress: optional callable of a :class:`curation.engine.progress.ProgressEvent`,
            called every ``log_every`` steps.

    Returns:
        A :class:`TrainResult` (the model in eval mode, history, throughput).
    """
    compute = compute or ComputeSpec()
    device = compute.torch_device()
    cfg = config
    strategy = make_strategy(cfg)
    model, preprocess, tokenizer = build_model(cfg, device=device)
    pcfg = _open_clip().get_model_preprocess_cfg(model)
    n = source.n
    batch, steps = plan_steps(cfg.samples_seen, cfg.batch_size, n)
    sizes = batch_sizes(cfg.samples_seen, batch, steps)
    log.info("%s/%s on %d pairs: %d steps x %d = %d samples seen (%s, %s)",
             cfg.model, cfg.strategy, n, steps, batch, sum(sizes), device, compute.precision)  # fmt: skip
    extra = strategy.setup(model, pcfg["mean"], pcfg["std"], device)
    groups = param_groups(model, extra, cfg.weight_decay)
    opt_kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    optimizer = adamw(groups, **opt_kwargs)
    scaler = torch.amp.GradScaler(device.type, enabled=compute.precision == "fp16")
    warmup = warmup_steps(cfg, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    max_log_scale = math.log(100.0)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    model.train()
    for m in extra:
        m.train()
    history: list[dict[str, float]] = []
    win = {"loss": 0.0, "clip_loss": 0.0, "ssl_loss": 0.0}
    win_n, win_samples, seen, data_s = 0, 0, 0, 0.0
    t_start = time.perf_counter()
    t_win = t_start
    per_epoch = n // batch
    stream = batch_stream(source, sizes, batch, gen)
    for step in range(steps):
        t_d = time.perf_counter()
        images, tokens, flip_ok = collate(next(stream), preprocess, tokenizer)
        b = Batch(images.to(device, non_blocking=True), tokens.to(device, non_blocking=True), flip_ok)
        data_s += time.perf_counter() - t_d
        lr = cosine_lr(step, steps, warmup, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with compute.autocast():
            losses = strategy.loss(model, b, gen)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step} ({cfg.model}/{cfg.strategy}, lr {lr:.2e})")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)
        for k in win:
            win[k] += float(losses[k].detach())
        win_n += 1
        win_samples += len(b)
        seen += len(b)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            now = time.perf_counter()
            rec = {
                "step": step + 1,
                "samples_seen": seen,
                "epoch": seen / (per_epoch * batch),
                **{k: v / win_n for k, v in win.items()},
                "lr": lr,
                "logit_scale": float(model.logit_scale.detach().exp()),
                "samples_per_s": win_samples / max(now - t_win, 1e-9),
                "elapsed_s": now - t_start,
            }
            history.append(rec)
            report(progress, "train", rec["step"], steps, seen, rec["elapsed_s"], rec["samples_per_s"],
                   loss=rec["loss"], lr=lr)  # fmt: skip
            log.info(
                "step %d/%d  samples %d  loss %.4f  lr %.2e  scale %.1f  %.0f samples/s",
                rec["step"], steps, rec["samples_seen"], rec["loss"], lr, rec["logit_scale"], rec["samples_per_s"],
            )  # fmt: skip
            win = {k: 0.0 for k in win}
            win_n, win_samples = 0, 0
            t_win = now
    stream.close()
    seconds = time.perf_counter() - t_start
    model.eval()
    log.info("trained in %.1fs (%.1fs decoding/preprocessing batches)", seconds, data_s)
    return TrainResult(
        model=model, config=cfg, steps=steps, batch_size=batch, samples_seen=seen, n_train=n,
        seconds=seconds, samples_per_s=seen / max(seconds, 1e-9), history=history,
    )  # fmt: skip


def train_clip(
    images: Sequence[object],
    captions: Sequence[str],
    config: TrainConfig,
    compute: ComputeSpec | None = None,
    progress=None,
) -> TrainResult:
    """:func:`run_training` on pairs in memory (decoded images or encoded bytes)."""
    return run_training(MemoryPairs(images, captions), config, compute, progress=progress)


def train_from_shards(
    tar_paths: Sequence[str | Path],
    config: TrainConfig,
    checkpoint_path: str | Path,
    compute: ComputeSpec | None = None,
    extra: dict[str, Any] | None = None,
    shuffle_buffer: int | None = None,
    progress=None,
) -> tuple[TrainResult, Path]:
    """Stream a subset export's webdataset shards through :func:`run_training`, save the checkpoint.

    Returns:
        ``(result, checkpoint path)``.
    """
    from curation.train.checkpoints import save_checkpoint
    from curation.train.data import DEFAULT_SHUFFLE_BUFFER

    source = ShardPairs(tar_paths, shuffle_buffer=shuffle_buffer or DEFAULT_SHUFFLE_BUFFER)
    result = run_training(source, config, compute, progress=progress)
    path = save_checkpoint(result, checkpoint_path, extra={**(extra or {}), "backend": "platform"})
    return result, path
