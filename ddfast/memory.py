"""Per-class memories and the minimax memory terms: the public API (method.md sections 2, 3).

A training step uses them in this order::

    bank = MemoryBank(num_classes, dim)                    # dim: flattened latent size D
    terms = bank.loss(x0_hat, labels)                      # against the memories as they are
    (loss_diffusion + terms.total).backward()
    bank.update(z0, x0_hat, labels)                        # then insert (x0_hat is detached)
    ...
    bank.end_epoch()                                       # at each epoch end (epoch timing)

Memories are keyed by the dataset's class index 0..C-1, whatever label conditions the model.
The arithmetic lives in ``ddfast.ref`` (pure torch); ``minimax_terms`` runs its per-class
extremes through the fused op ``torch.ops.ddfast.class_extremes``, insertion runs through
``torch.ops.ddfast.insert_memory`` and adaptive epoch pruning through
``torch.ops.ddfast.prune_adaptive`` (``ddfast.ops``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddfast.distributed import Dist
from ddfast.errors import ConfigError
from ddfast.ops import class_extremes, insert_memory, prune_adaptive
from ddfast.ref import (
    MinimaxTerms,
    combine_minimax_terms,
    prune_fifo_ref,
    unit_rows_ref,
)

__all__ = ["POLICIES", "TIMINGS", "ClassMemory", "MemoryBank", "MinimaxTerms", "minimax_terms"]

POLICIES = ("fifo", "adaptive")  # fifo: Minimax's rule; adaptive: this paper's (the default)
TIMINGS = ("step", "epoch")  # step: released code (default); epoch: the paper's figure caption
_STATE_KEYS = ("items", "counts", "staged_items", "staged_labels", "policy", "timing",
               "num_classes", "capacity", "dim")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_labels(labels: object, batch: int, num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise ValueError("labels must be an integer tensor of dataset class indices, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) to match the batch, "
                         f"got {tuple(labels.shape)}")
    # A range check costs a host sync on an accelerator (and a graph break under torch.compile);
    # there an out-of-range label surfaces as an indexing error instead.
    if labels.device.type == "cpu" and batch and not torch.compiler.is_compiling() \
            and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be dataset class indices in [0, {num_classes}), got "
                         f"values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def _check_latents(name: str, x: object, dim: int) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{name} must be a floating tensor of shape (B, ...), got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # (B, D)
    if flat.shape[1] != dim:
        raise ValueError(f"{name} has {flat.shape[1]} values per sample but the memory holds "
                         f"dim={dim}; build the memory with dim equal to the flattened latent size")
    return flat


class ClassMemory:
    """A fixed-capacity memory of flattened latents for each class, in preallocated tensors.

    ``items`` (C, N, D) float32 and ``counts`` (C,) int64: class c holds ``items[c, :counts[c]]``
    in logical insertion order, oldest first; later slots are unused and zero. Evictions compact
    the survivors in order, so slot index is age rank and "first index on ties" means oldest.

    ``policy``: ``"fifo"`` drops the oldest items; ``"adaptive"`` repeatedly drops the item of
    largest similarity degree ``s_i = sum_j cos(m_i, m_j)`` (first index on ties).
    ``timing``: ``"step"`` appends each batch and shrinks at once (the released code); ``"epoch"``
    stages the batches and prunes memory + staged items to capacity in ``end_epoch()`` (the
    paper's reading; the memory the loss sees then changes only at epoch ends). The staging area
    is a flat (S, D) float32 buffer plus (S,) labels in arrival order; S starts at
    ``stage_capacity`` (e.g. the number of samples per epoch) and doubles when a batch does not
    fit, which needs no host sync because batch sizes are host ints.
    """

    def __init__(self, num_classes: int, capacity: int, dim: int, *, policy: str = "adaptive",
                 timing: str = "step", device: torch.device | str | None = None,
                 stage_capacity: int = 0) -> None:
        self.num_classes = _positive_int("num_classes", num_classes)
        self.capacity = _positive_int("capacity", capacity)
        self.dim = _positive_int("dim", dim)
        self.policy = _choice("policy", policy, POLICIES)
        self.timing = _choice("timing", timing, TIMINGS)
        if isinstance(stage_capacity, bool) or not isinstance(stage_capacity, int) \
                or stage_capacity < 0:
            raise ConfigError(f"stage_capacity must be an int >= 0, got {stage_capacity!r}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        shape = (self.num_classes, self.capacity, self.dim)
        self.items = torch.zeros(shape, dtype=torch.float32, device=self.device)  # (C, N, D)
        self.counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)  # (C,)
        rows = stage_capacity if self.timing == "epoch" else 0
        self._staged_items = torch.zeros(rows, self.dim, device=self.device)  # (S, D)
        self._staged_labels = torch.zeros(rows, dtype=torch.int64, device=self.device)  # (S,)
        self._num_staged = 0

    def __repr__(self) -> str:
        return (f"ClassMemory(num_classes={self.num_classes}, capacity={self.capacity}, "
                f"dim={self.dim}, policy={self.policy!r}, timing={self.timing!r}, "
                f"device={str(self.device)!r})")

    @property
    def num_staged(self) -> int:
        """Items staged since the last ``end_epoch()`` (always 0 for step timing)."""
        return self._num_staged

    def insert(self, items: Tensor, labels: Tensor) -> None:
        """Add a batch, detached and cast to float32. items (B, D) or (B, ...); labels (B,).

        Step timing appends each class's items in batch order and shrinks to capacity by the
        policy, without host sync; epoch timing stages them until ``end_epoch()``.
        """
        flat = _check_latents("items", items, self.dim)  # (B, D)
        labels = _check_labels(labels, flat.shape[0], self.num_classes)  # (B,)
        flat = flat.detach().to(device=self.device, dtype=torch.float32)
        labels = labels.to(self.device)
        if flat.shape[0] == 0:
            return
        if self.timing == "epoch":
            self._stage(flat, labels)
        else:
            # The fused op (backend chosen per device by ddfast.backend); ddfast.ref's
            # insert_fifo_ref / insert_adaptive_ref are the same computation in plain torch.
            insert_memory(self.items, self.counts, flat, labels, self.policy == "adaptive")

    def _stage(self, flat: Tensor, labels: Tensor) -> None:
        need = self._num_staged + flat.shape[0]
        if need > self._staged_items.shape[0]:
            rows = max(need, 2 * self._staged_items.shape[0], 64)
            grown = torch.zeros(rows, self.dim, device=self.device)  # (S', D)
            grown_labels = torch.zeros(rows, dtype=torch.int64, device=self.device)  # (S',)
            grown[: self._num_staged] = self._staged_items[: self._num_staged]
            grown_labels[: self._num_staged] = self._staged_labels[: self._num_staged]
            self._staged_items, self._staged_labels = grown, grown_labels
        self._staged_items[self._num_staged : need] = flat
        self._staged_labels[self._num_staged : need] = labels
        self._num_staged = need

    def end_epoch(self) -> None:
        """Epoch timing: prune each class's memory + staged items (in that logical order) to
        capacity by the policy (fifo keeps the newest), then empty the staging area.

        No-op for step timing. Syncs with the host once per class that staged items.
        """
        if self.timing == "step" or self._num_staged == 0:
            return
        labels = self._staged_labels[: self._num_staged]  # (S,)
        order = torch.argsort(labels, stable=True)  # (S,) grouped by class, arrival order kept
        staged = self._staged_items[: self._num_staged][order]  # (S, D)
        per_class = torch.bincount(labels, minlength=self.num_classes).tolist()
        counts = self.counts.tolist()
        start = 0
        for c, num_new in enumerate(per_class):
            if num_new == 0:
                continue
            pool = torch.cat([self.items[c, : counts[c]], staged[start : start + num_new]])
            start += num_new
            if self.policy == "fifo":
                keep = prune_fifo_ref(pool.shape[0], self.capacity, self.device)
            else:
                keep = prune_adaptive(pool, self.capacity)  # ddfast.ref.prune_adaptive_ref
            self.items[c].zero_()
            self.items[c, : keep.shape[0]] = pool[keep]
            self.counts[c] = keep.shape[0]
        self._num_staged = 0

    def class_items(self, c: int) -> Tensor:
        """A copy of class c's current items in logical order, oldest first. -> (k, D)."""
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.num_classes:
            raise ValueError(f"class index must be an int in [0, {self.num_classes}), got {c!r}")
        return self.items[c, : int(self.counts[c])].clone()

    def mean_pairwise_cosine(self) -> Tensor:
        """Mean cosine over distinct pairs of each class's items, for logging. -> (C,) float32.

        Lower means a more diverse memory; NaN for classes holding fewer than 2 items. Staged
        items are not counted.
        """
        slots = torch.arange(self.capacity, device=self.device)  # (N,)
        used = (slots.unsqueeze(0) < self.counts.unsqueeze(1)).unsqueeze(-1)  # (C, N, 1)
        u = torch.where(used, unit_rows_ref(self.items), 0.0)  # (C, N, D)
        total = u.sum(1)  # (C, D)
        all_pairs = (total * total).sum(-1)  # (C,) sum over i, j of cos, i == j included
        self_pairs = (u * u).sum((1, 2))  # (C,)
        k = self.counts.to(torch.float32)  # (C,)
        mean = (all_pairs - self_pairs) / (k * (k - 1)).clamp_min(1.0)  # (C,)
        return torch.where(self.counts >= 2, mean, math.nan)

    def state_dict(self) -> dict[str, Tensor | str | int]:
        """Tensors (references, like ``nn.Module.state_dict``) and the configuration."""
        return {
            "items": self.items,
            "counts": self.counts,
            "staged_items": self._staged_items[: self._num_staged],
            "staged_labels": self._staged_labels[: self._num_staged],
            "policy": self.policy,
            "timing": self.timing,
            "num_classes": self.num_classes,
            "capacity": self.capacity,
            "dim": self.dim,
        }

    def load_state_dict(self, state: dict[str, Tensor | str | int]) -> None:
        """Restore from ``state_dict()``; the configuration must match this memory's."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ConfigError(f"memory state is missing {missing}; pass a ClassMemory.state_dict()")
        for key in ("policy", "timing", "num_classes", "capacity", "dim"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"memory state has {key}={state[key]!r} but this memory has "
                                  f"{key}={getattr(self, key)!r}; construct it with the "
                                  f"checkpoint's {key}")
        items, counts = state["items"], state["counts"]
        staged, staged_labels = state["staged_items"], state["staged_labels"]
        expect = {"items": (self.num_classes, self.capacity, self.dim),
                  "counts": (self.num_classes,)}
        for key, value in (("items", items), ("counts", counts)):
            if not isinstance(value, Tensor) or tuple(value.shape) != expect[key]:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ConfigError(f"memory state {key} has shape {got} but this memory needs "
                                  f"{expect[key]}; construct it with the checkpoint's "
                                  "num_classes, capacity and dim")
        if not (isinstance(staged, Tensor) and isinstance(staged_labels, Tensor)
                and staged.dim() == 2 and staged.shape[1] == self.dim
                and tuple(staged_labels.shape) == (staged.shape[0],)):
            raise ConfigError(f"memory state staged_items must be (S, {self.dim}) and "
                              "staged_labels (S,)")
        if self.timing == "step" and staged.shape[0]:
            raise ConfigError("memory state has staged items but timing is 'step'")
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > self.capacity):
            raise ConfigError(f"memory state counts must lie in [0, {self.capacity}]")
        if staged_labels.numel() and (int(staged_labels.min()) < 0
                                      or int(staged_labels.max()) >= self.num_classes):
            raise ConfigError(f"memory state staged_labels must lie in [0, {self.num_classes})")
        self.counts.copy_(counts)
        slots = torch.arange(self.capacity, device=self.device)  # (N,)
        used = (slots.unsqueeze(0) < self.counts.unsqueeze(1)).unsqueeze(-1)  # (C, N, 1)
        # Unused slots are zero by convention; enforce it on load.
        self.items.copy_(torch.where(used, items.to(self.device, torch.float32), 0.0))
        self._num_staged = 0
        self._stage(staged.to(self.device, torch.float32), staged_labels.to(self.device).long())


def minimax_terms(x0_hat: Tensor, labels: Tensor, real_items: Tensor, real_counts: Tensor,
                  gen_items: Tensor, gen_counts: Tensor, *, lambda_r: float, lambda_g: float,
                  accumulate_bug: bool = False, dist: Dist | None = None) -> MinimaxTerms:
    """Representativeness and diversity terms of a batch against per-class memories.

    For each class c in the batch whose generated memory is non-empty (n = distinct classes in
    the batch; cos uses norms floored at 1e-8):
      rep[c] = lambda_r / n * (1 - min over (samples of c) x M_real[c] of cos)
      div[c] = lambda_g / n * max over (samples of c) x M_gen[c] of cos
    rep[c] is 0 when M_real[c] is empty; both are 0 for classes absent from the batch or with an
    empty generated memory. Only the sample of each extreme pair gets gradient; the memories
    are constants. ``accumulate_bug=True`` reproduces the released code's repeated counting of
    earlier classes (see ``ddfast.ref.minimax_terms_ref``); it is NOT the method.

    x0_hat (B, D) any float dtype (similarities in float32); labels (B,) class indices;
    real_items (C, N_R, D); real_counts (C,); gen_items (C, N_G, D); gen_counts (C,).
    Returns MinimaxTerms(total (), rep (C,), div (C,)); total == rep.sum() + div.sum().
    No host synchronisation on accelerators.

    ``dist`` (several processes, each holding its slice of a global batch in rank order): the
    extremes and n are those of the global batch (``Dist.global_extreme``), so every rank gets
    the global terms, with gradient only on the rank holding each extreme sample.
    """
    for name, value in (("lambda_r", lambda_r), ("lambda_g", lambda_g)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    if real_items.dim() != 3 or gen_items.dim() != 3 or real_items.shape[0] != gen_items.shape[0] \
            or real_items.shape[2] != gen_items.shape[2]:
        raise ValueError("real_items and gen_items must be (C, N_R, D) and (C, N_G, D), got "
                         f"{tuple(real_items.shape)} and {tuple(gen_items.shape)}")
    num_classes, dim = real_items.shape[0], real_items.shape[2]
    if real_counts.shape != (num_classes,) or gen_counts.shape != (num_classes,):
        raise ValueError(f"real_counts and gen_counts must have shape ({num_classes},)")
    if x0_hat.dim() != 2:
        raise ValueError(f"x0_hat must be flattened to (B, D), got {tuple(x0_hat.shape)}")
    x0_hat = _check_latents("x0_hat", x0_hat, dim)
    if x0_hat.shape[0] == 0:
        raise ValueError("x0_hat is an empty batch; call minimax_terms with at least one sample")
    labels = _check_labels(labels, x0_hat.shape[0], num_classes)
    if x0_hat.device != real_items.device:
        raise ValueError(f"x0_hat is on {x0_hat.device} but the memories are on "
                         f"{real_items.device}; build the memory with device={x0_hat.device}")
    labels = labels.to(real_items.device)
    # The fused op (backend chosen per device by ddfast.backend); ddfast.ref.minimax_terms_ref
    # is the same computation in plain torch.
    rep_min = class_extremes(x0_hat, labels, real_items, real_counts, False)[0]  # (C,)
    div_max = class_extremes(x0_hat, labels, gen_items, gen_counts, True)[0]  # (C,)
    if dist is not None and dist.active:
        rep_min = dist.global_extreme(rep_min, largest=False)
        div_max = dist.global_extreme(div_max, largest=True)
        labels = dist.all_gather(labels)  # (R * B,) the global batch's classes
    return combine_minimax_terms(rep_min, div_max, labels, real_counts, gen_counts,
                                 lambda_r=float(lambda_r), lambda_g=float(lambda_g),
                                 accumulate_bug=accumulate_bug)


class MemoryBank:
    """The real and generated memories the trainer uses (method.md section 3).

    ``real`` holds the clean latents z0 each step trained on; ``gen`` holds detached x0_hat.
    Both share policy and timing; capacities are separate (N_R, N_G; 64 each by default).
    """

    def __init__(self, num_classes: int, dim: int, *, real_capacity: int = 64,
                 gen_capacity: int = 64, policy: str = "adaptive", timing: str = "step",
                 device: torch.device | str | None = None, stage_capacity: int = 0) -> None:
        self.real = ClassMemory(num_classes, real_capacity, dim, policy=policy, timing=timing,
                                device=device, stage_capacity=stage_capacity)
        self.gen = ClassMemory(num_classes, gen_capacity, dim, policy=policy, timing=timing,
                               device=device, stage_capacity=stage_capacity)

    def __repr__(self) -> str:
        return f"MemoryBank(real={self.real!r}, gen={self.gen!r})"

    def loss(self, x0_hat: Tensor, labels: Tensor, *, lambda_r: float = 0.002,
             lambda_g: float = 0.008, accumulate_bug: bool = False,
             dist: Dist | None = None) -> MinimaxTerms:
        """Memory terms of a batch against the memories as they are (call before ``update``).

        x0_hat (B, D) or (B, ...) (flattened), with gradient; labels (B,) dataset classes.
        See ``minimax_terms`` (and its ``dist``). -> MinimaxTerms(total (), rep (C,), div (C,)).
        """
        flat = _check_latents("x0_hat", x0_hat, self.real.dim)  # (B, D)
        return minimax_terms(flat, labels, self.real.items, self.real.counts, self.gen.items,
                             self.gen.counts, lambda_r=lambda_r, lambda_g=lambda_g,
                             accumulate_bug=accumulate_bug, dist=dist)

    def update(self, real_latents: Tensor, x0_hat: Tensor, labels: Tensor,
               dist: Dist | None = None) -> None:
        """Insert z0 into ``real`` and x0_hat (detached) into ``gen``, after the loss.

        real_latents (B, D) or (B, ...); x0_hat (B, D) or (B, ...); labels (B,). With ``dist``
        every rank's items are gathered and inserted in rank order, so all ranks hold the
        memories one process would hold after the global batch.
        """
        if dist is not None and dist.active:
            real_latents = dist.all_gather(real_latents.flatten(1))
            x0_hat = dist.all_gather(x0_hat.flatten(1))
            labels = dist.all_gather(labels)
        self.real.insert(real_latents, labels)
        self.gen.insert(x0_hat.detach(), labels)

    def end_epoch(self) -> None:
        """Prune staged items into both memories (epoch timing); no-op for step timing."""
        self.real.end_epoch()
        self.gen.end_epoch()

    def state_dict(self) -> dict[str, Tensor | str | int]:
        """One flat dict, ``real.<key>`` and ``gen.<key>`` (see ``ClassMemory.state_dict``), so
        it stores as-is in a tensors-plus-JSON checkpoint such as safetensors."""
        state: dict[str, Tensor | str | int] = {}
        for prefix, memory in (("real.", self.real), ("gen.", self.gen)):
            state.update({prefix + k: v for k, v in memory.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor | str | int]) -> None:
        """Restore from ``state_dict()``; the configuration must match this bank's."""
        if not isinstance(state, dict) or not any(k.startswith("real.") for k in state) \
                or not any(k.startswith("gen.") for k in state):
            raise ConfigError("memory bank state must hold 'real.*' and 'gen.*' entries; pass a "
                              "MemoryBank.state_dict()")
        for prefix, memory in (("real.", self.real), ("gen.", self.gen)):
            memory.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                    if k.startswith(prefix)})
