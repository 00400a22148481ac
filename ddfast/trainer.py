"""The training loop, one readable function for both stages.

``pretrain``: a small DiT learns the data from scratch (all parameters, DiT's hybrid loss).
``finetune``: the method (method.md sections 2-3): DiT's hybrid loss plus the representativeness
and diversity terms against per-class memories of real and generated latents, which are updated
after the loss of every step (or staged and pruned at the end of each epoch).

The step draws everything it needs from one device generator whose state is checkpointed, and
the data order of each epoch is a pure function of (seed, stage, epoch), so a resumed run ends
exactly where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ddfast import perf
from ddfast.checkpoint import load_checkpoint, optimizer_from_tensors, save_checkpoint
from ddfast.data.cache import LatentSet
from ddfast.diffusion import Diffusion
from ddfast.distributed import Dist
from ddfast.errors import DdfastError
from ddfast.io import append_jsonl, drop_logged_after
from ddfast.memory import MemoryBank
from ddfast.models import EMA
from ddfast.progress import bar, log


class NonFiniteLossError(DdfastError, FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: training finished its step and saved a checkpoint first."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


@contextlib.contextmanager
def deferred_stop():
    """While training, SIGINT and SIGTERM only raise a flag (``flag["signal"]``); the loop
    finishes its step, saves a checkpoint and raises StopRequested, so a stop never leaves a
    half-updated model. The previous handlers come back on exit. Outside the main thread
    (where handlers cannot be set) it is a plain flag that nothing raises."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame) -> None:
        flag["signal"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass(frozen=True)
class StageSpec:
    name: str  # pretrain | finetune
    steps: int  # total optimiser steps of the stage
    batch_size: int  # images per step
    lr: float  # AdamW learning rate (after warm-up)
    weight_decay: float  # AdamW weight decay
    warmup: int  # linear warm-up steps (0 = constant from the start)
    ema_decay: float  # EMA decay of the trainable parameters
    label_dropout: float  # probability of conditioning on the null class
    lambda_r: float = 0.0  # representativeness weight (finetune)
    lambda_g: float = 0.0  # diversity weight (finetune)
    log_every: int = 50  # steps between log lines
    ckpt_every: int = 500  # steps between checkpoints
    seed: int = 0  # run seed
    accumulate_bug: bool = False  # released loop's repeated class sums (not the method)
    refresh_every: int = 0  # steps between bank.end_epoch() calls; 0 = each pass over the data
    decay: str = "constant"  # constant | cosine: lr after warm-up (cosine falls toward 0)


def stage_lr(spec: StageSpec, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of a stage (see ``scheduled_lr``)."""
    return scheduled_lr(spec.lr, step, spec.steps, spec.warmup, spec.decay)


def scheduled_lr(lr: float, step: int, steps: int, warmup: int, decay: str) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``steps``: linear warm-up over
    ``warmup`` steps, then constant (``decay`` "constant"), or a half cosine from ``lr`` that
    would reach 0 one step after the last (the last step's rate is small but not 0)."""
    if warmup > 0 and step < warmup:
        return lr * ((step + 1) / warmup)  # in this order: old logs reproduce
    if decay == "cosine":
        span = max(1, steps - warmup)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return lr


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    """Full batches per pass; the last partial batch is dropped, as the published loops do."""
    return max(1, num_items // batch_size)


def epoch_order(num_items: int, seed: int, stage: str, epoch: int) -> torch.Tensor:
    """The item order of one epoch: a permutation fixed by (seed, stage, epoch)."""
    digest = hashlib.sha256(f"{seed}:{stage}:{epoch}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(num_items, generator=gen)  # (N,)


def model_autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` when ``precision`` is "bf16", else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def objective(model, diffusion: Diffusion, z0: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor, y: torch.Tensor, labels: torch.Tensor,
              bank: MemoryBank | None, lambda_r: float, lambda_g: float, accumulate_bug: bool,
              precision: str, dist: Dist | None = None):
    """The method's loss of one batch (method.md section 2), before any update.

    Returns the scalar loss to differentiate, the (5,) detached diffusion loss, mse, vb, rep,
    div, x0_hat (B, D) with its gradient, and the model's output detached (for
    ``term_grad_norms``). The model runs under bf16 autocast when
    ``precision`` is "bf16"; the diffusion and memory terms stay float32. With ``dist`` the
    memory terms are the global batch's and count ``dist.world`` times, since DDP averages the
    gradients over ranks. ``torch.compile`` traces all of it, the memory ops included.
    """
    z_t = diffusion.q_sample(z0, t, noise)
    with model_autocast(z0.device, precision):
        out = model(z_t, timestep=t, class_labels=y, return_dict=False)[0]
    terms = diffusion.training_losses(out.float(), z0, z_t, t, noise)
    loss = diffusion_loss = terms["loss"].mean()
    x0_flat = terms["x0_hat"].flatten(1)  # (B, D) fp32, carries gradient
    rep = div = torch.zeros((), device=z0.device)
    if bank is not None:
        mm = bank.loss(x0_flat, labels, lambda_r=lambda_r, lambda_g=lambda_g,
                       accumulate_bug=accumulate_bug, dist=dist)
        loss = loss + mm.total * (dist.world if dist is not None else 1)
        rep, div = mm.rep.sum(), mm.div.sum()
    logged = torch.stack([diffusion_loss, terms["mse"].mean(), terms["vb"].mean(), rep, div])
    return loss, logged.detach(), x0_flat, out.detach()


def term_grad_norms(out: torch.Tensor, diffusion: Diffusion, z0: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, labels: torch.Tensor, bank: MemoryBank, lambda_r: float,
                    lambda_g: float, accumulate_bug: bool,
                    dist: Dist | None = None) -> torch.Tensor:
    """(3,) detached: the norm of the gradient of the diffusion loss, of the representativeness
    term and of the diversity term with respect to the model's output ``out`` (B, 2c, h, w).

    Every term reaches the parameters through that output, so the three norms say how hard each
    term pushes the model. The loss heads are recomputed here from ``out`` (before the memories
    are updated), which costs no model pass, works the same whether the objective was compiled
    or not, and gives DDP nothing to reduce. A term without a pair (empty memories) has norm 0.
    """
    out = out.detach().float().requires_grad_()
    z_t = diffusion.q_sample(z0, t, noise)
    terms = diffusion.training_losses(out, z0, z_t, t, noise)
    mm = bank.loss(terms["x0_hat"].flatten(1), labels, lambda_r=lambda_r, lambda_g=lambda_g,
                   accumulate_bug=accumulate_bug, dist=dist)
    norms = []
    for term in (terms["loss"].mean(), mm.rep.sum(), mm.div.sum()):
        grad = None
        if term.requires_grad:
            (grad,) = torch.autograd.grad(term, out, retain_graph=True, allow_unused=True)
        norms.append(torch.zeros((), device=out.device) if grad is None
                     else torch.linalg.vector_norm(grad))
    return torch.stack(norms).detach()


def train_step(model, opt: torch.optim.Optimizer, ema: EMA, diffusion: Diffusion,
               z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor,
               labels: torch.Tensor, *, bank: MemoryBank | None = None, lambda_r: float = 0.0,
               lambda_g: float = 0.0, accumulate_bug: bool = False, precision: str = "fp32",
               loss_fn=objective, dist: Dist | None = None,
               grad_norms: torch.Tensor | None = None) -> torch.Tensor:
    """One optimiser step of the objective; nothing in it waits for the device.

    model(z_t, timestep=, class_labels=, return_dict=False) is the DiT (DDP-wrapped under
    ``dist``); z0, noise (B, c, h, w) float32; t (B,) timesteps; y (B,) conditioning labels;
    labels (B,) dataset classes: this rank's slice of the global batch. ``loss_fn`` is
    ``objective`` or its compiled form. With a bank the memory terms join the loss before the
    memories are updated. Returns (5,) detached, the global batch's: loss, mse, vb, rep, div.
    ``grad_norms`` (3,), when given, receives ``term_grad_norms`` of this batch (this rank's).
    """
    loss, logged, x0_flat, out = loss_fn(model, diffusion, z0, t, noise, y, labels, bank,
                                         lambda_r, lambda_g, accumulate_bug, precision, dist)
    if grad_norms is not None and bank is not None:
        grad_norms.copy_(term_grad_norms(out, diffusion, z0, t, noise, labels, bank, lambda_r,
                                         lambda_g, accumulate_bug, dist))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema.update()
    if bank is not None:
        bank.update(z0.flatten(1), x0_flat.detach(), labels, dist=dist)
    if dist is not None:
        logged = torch.cat([dist.mean(logged[:3]), logged[3:]])  # rep, div are global already
    return torch.cat([(logged[0] + logged[3] + logged[4]).view(1), logged[1:]])


def train_stage(model: torch.nn.Module, latents: LatentSet, diffusion: Diffusion,
                cond_table: torch.Tensor, null_label: int, spec: StageSpec, *,
                ckpt_path: Path, metrics_path: Path, bank: MemoryBank | None = None,
                precision: str = "fp32", progress: bool = False, compile: bool = False,
                dist: Dist | None = None) -> EMA:
    """Train ``model`` in place for ``spec.steps`` steps (resuming from ``ckpt_path``).

    cond_table: (C,) conditioning label of each dataset class. Returns the EMA of the trainable
    parameters at the end of the stage. The model stays in eval mode: diffusers' DiT would
    otherwise drop labels with its own fixed rate and global RNG, and ddfast drops them itself.
    ``compile``: run the loss (the model's forward, the diffusion and memory terms) and its
    backward through ``torch.compile``; the parameters and checkpoints are the same module's.

    ``dist`` (torchrun): ``spec.batch_size`` is the global batch. Every rank draws the global
    batch and its randomness from the same generator and trains on its slice, under DDP, with
    the memory terms and memories of the global batch; rank 0 alone writes the checkpoints (the
    memories once) and the metrics. So a run, and its resume, give the same results (to float
    rounding) on any number of processes.
    """
    device = latents.labels.device
    dist = dist or Dist.single()
    shard = dist.shard(spec.batch_size)
    model.eval()
    loss_fn = perf.compile(objective) if compile else objective
    forward = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay,
                            foreach=not fused, fused=fused or None)
    ema = EMA(params, decay=spec.ema_decay)
    stage_seed = hashlib.sha256(f"{spec.seed}:{spec.name}:draws".encode()).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(stage_seed[:8], "little") >> 1)
    per_epoch = steps_per_epoch(len(latents), spec.batch_size)
    start = 0
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        with torch.no_grad():
            for name, p in named:
                p.copy_(ck["params"][name])
        ema.load_state_dict(ck["ema"])
        optimizer_from_tensors(opt, *ck["optimizer"])
        gen.set_state(ck["rng"])
        if bank is not None:
            bank.load_state_dict(ck["memory"])
        start = ck["step"]
        if dist.main and start < spec.steps:
            log(f"[{spec.name}] resuming at step {start}/{spec.steps}")
    if dist.main:
        # Log lines of this stage written after the checkpoint (all of them when there is none:
        # a run folder whose outputs were deleted, or that holds only its committed logs) will
        # be written again; keep each step's line once.
        drop_logged_after(metrics_path, spec.name, start)

    def checkpoint(step: int) -> None:
        if not dist.main:
            dist.barrier()  # rank 0 is writing it
            return
        save_checkpoint(ckpt_path, step=step, params={n: p for n, p in named},
                        ema=ema.state_dict(), optimizer=opt, generator=gen,
                        memory=bank.state_dict() if bank is not None else None,
                        extra={"stage": spec.name, "steps": spec.steps})
        dist.barrier()

    sums = torch.zeros(5, device=device)  # loss, mse, vb, rep, div over the log window
    norms = torch.zeros(3, device=device)  # gradient norms of the terms at the window's end
    window_start, window_steps = time.perf_counter(), 0
    order, order_epoch = None, -1
    pbar = bar(total=spec.steps, initial=start, enabled=progress and dist.main, desc=spec.name,
               unit="step")
    guard = contextlib.ExitStack()
    stop = guard.enter_context(deferred_stop())
    guard.callback(pbar.close)
    with guard:
        for step in range(start, spec.steps):
            epoch, pos = divmod(step, per_epoch)
            if epoch != order_epoch:
                order = epoch_order(len(latents), spec.seed, spec.name, epoch).to(device)
                order_epoch = epoch
            idx = order[pos * spec.batch_size:(pos + 1) * spec.batch_size]  # (B,)
            labels = latents.labels[idx]  # (B,) dataset classes
            z0 = latents.draw(idx, gen)  # (B, c, h, w)
            t = torch.randint(0, diffusion.num_steps, (idx.shape[0],), device=device,
                              generator=gen)
            noise = torch.randn(z0.shape, device=device, generator=gen)
            drop = torch.rand(idx.shape[0], device=device, generator=gen) < spec.label_dropout
            y = torch.where(drop, torch.full_like(labels, null_label),
                            cond_table[labels])  # (B,)
            lr = stage_lr(spec, step)
            for group in opt.param_groups:
                group["lr"] = lr

            # The global batch and its draws on every rank; this rank trains on its slice. The
            # last step of each log window also measures how hard each term pushes the model.
            done = step + 1
            log_now = done % spec.log_every == 0 or done == spec.steps
            probe = bank is not None and log_now
            sums += train_step(forward, opt, ema, diffusion, z0[shard], t[shard], noise[shard],
                               y[shard], labels[shard], bank=bank, lambda_r=spec.lambda_r,
                               lambda_g=spec.lambda_g, accumulate_bug=spec.accumulate_bug,
                               precision=precision, loss_fn=loss_fn, dist=dist,
                               grad_norms=norms if probe else None)
            if bank is not None and (step + 1) % (spec.refresh_every or per_epoch) == 0:
                bank.end_epoch()
            window_steps += 1
            pbar.update(1)
            if log_now:
                values = (sums / window_steps).tolist()  # the one host sync per log window
                if not all(math.isfinite(v) for v in values):
                    raise NonFiniteLossError(
                        f"[{spec.name}] the loss became {values[0]} at step {done}; the last "
                        f"good checkpoint {ckpt_path} is kept. Lower the learning rate "
                        f"(--optim.lr or --pretrain.lr) or check the data, then resume")
                elapsed = time.perf_counter() - window_start
                record = {"stage": spec.name, "step": done, "epoch": epoch, "lr": lr,
                          "loss": values[0], "mse": values[1], "vb": values[2],
                          "rep": values[3], "div": values[4],
                          "images_per_s": window_steps * spec.batch_size / elapsed}
                if bank is not None:
                    record["memory_cos_real"] = _nanmean(bank.real.mean_pairwise_cosine())
                    record["memory_cos_gen"] = _nanmean(bank.gen.mean_pairwise_cosine())
                    g_diff, g_rep, g_div = norms.tolist()
                    record.update(grad_diffusion=g_diff, grad_rep=g_rep, grad_div=g_div)
                if dist.main:
                    append_jsonl(metrics_path, record)
                    log(f"[{spec.name}] step {done}/{spec.steps} loss {values[0]:.4f} "
                        f"(mse {values[1]:.4f} vb {values[2]:.4f} rep {values[3]:.5f} "
                        f"div {values[4]:.5f}) {record['images_per_s']:.0f} img/s"
                        + (f"; |grad| diffusion {g_diff:.3g} rep {g_rep:.3g} div {g_div:.3g}"
                           if bank is not None else ""))
                sums.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if done % spec.ckpt_every == 0 and done < spec.steps:
                checkpoint(done)
            signum = stop["signal"]
            if dist.active:
                # A signal reaches the ranks at different steps: they agree at each log interval
                # (one all-reduce), so all stop after the same step and none waits on the others.
                signum = (dist.agree_max(signum or 0, device) or None) if log_now else None
            if signum is not None:
                if done % spec.ckpt_every or done == spec.steps:  # not saved just above
                    checkpoint(done)
                name = signal.Signals(signum).name
                raise StopRequested(f"[{spec.name}] stopped by {name} after step {done}/"
                                    f"{spec.steps}; {ckpt_path} holds it", signum)
    if start < spec.steps or not ckpt_path.is_file():
        checkpoint(spec.steps)
    return ema


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")
