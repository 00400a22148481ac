"""Training checkpoints: one safetensors file per stage, written atomically.

A checkpoint holds the trainable parameters, their EMA, the optimiser state, the memories, the
random generator state and the step, so that a resumed run continues to exactly the result of an
uninterrupted one. Non-tensor state (step, optimiser hyper-parameters) lives in the safetensors
metadata as JSON; nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ddfast.errors import OutputError
from ddfast.io import load_tensors, save_tensors


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten an optimiser's state into named tensors plus JSON for everything else."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           blob: str) -> None:
    meta = json.loads(blob)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, *, step: int, params: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, memory: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Write a stage checkpoint atomically (the previous one stays until the rename)."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"param.{k}": v for k, v in params.items()})
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    opt_tensors, opt_blob = optimizer_to_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.generator"] = generator.get_state()
    memory_meta = {}
    for key, value in (memory or {}).items():
        if torch.is_tensor(value):
            tensors[f"memory.{key}"] = value
        else:
            memory_meta[key] = value
    metadata = {
        "step": str(step),
        "optimizer": opt_blob,
        "memory": json.dumps(memory_meta),
        "extra": json.dumps(extra or {}),
        "torch": torch.__version__,
    }
    save_tensors(path, tensors, metadata)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint into {step, params, ema, optimizer tensors, memory, rng, extra}."""
    try:
        tensors, meta = load_tensors(path)
    except Exception as exc:
        raise OutputError(f"checkpoint {path} is unreadable ({exc}); delete it to restart this "
                          f"stage, or pass --overwrite to start the run over") from exc

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    memory: dict[str, Any] = section("memory.")
    memory.update(json.loads(meta.get("memory", "{}")))
    return {
        "step": int(meta["step"]),
        "params": section("param."),
        "ema": section("ema."),
        "optimizer": ({k: v for k, v in tensors.items() if k.startswith("opt.")},
                      meta["optimizer"]),
        "rng": tensors["rng.generator"],
        "memory": memory,
        "extra": json.loads(meta.get("extra", "{}")),
    }
