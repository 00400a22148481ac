"""The original DiT's checkpoint layout (facebookresearch/DiT ``models.py``), in and out.

Three kinds of ``.pt`` file hold DiT weights in that layout:

* the released weights (``DiT-XL-2-256x256.pt``): a plain state dict;
* DiT's own training checkpoints: ``{"model", "ema", "opt", "args"}``;
* the fine-tuning checkpoints of Minimax diffusion and of the paper's released code: the same
  dict, whose first blocks (14 in the released models, whatever the depth) also hold DiffFit
  scales (``gamma``; see ``_GAMMA_SITES``).

``load_original`` turns any of them into ddfast's DiT (diffusers' module with the original
numerics, DiffFit scales attached where the file has them); ``save_original`` writes a ddfast
DiT back in the original layout. Files are read with ``torch.load(weights_only=True)``: tensors,
containers and plain values only (plus ``argparse.Namespace``, in which DiT's train script keeps
its ``args``), never arbitrary objects.

The original's names and ddfast's (diffusers') correspond one to one:

=====================================  ==========================================================
original                               ddfast (block ``i``)
=====================================  ==========================================================
x_embedder.proj                        pos_embed.proj
pos_embed (fixed sin-cos table)        pos_embed.pos_embed (recomputed; checked on loading)
t_embedder.mlp.0 / .mlp.2              transformer_blocks.0.norm1.emb.timestep_embedder.linear_1/2
y_embedder.embedding_table             transformer_blocks.0.norm1.emb.class_embedder.embedding_table
blocks.i.attn.qkv (rows q, k, v)       transformer_blocks.i.attn1.to_q / to_k / to_v
blocks.i.attn.proj                     transformer_blocks.i.attn1.to_out.0
blocks.i.mlp.fc1 / fc2                 transformer_blocks.i.ff.net.0.proj / ff.net.2
blocks.i.adaLN_modulation.1            transformer_blocks.i.norm1.linear
final_layer.adaLN_modulation.1         proj_out_1
final_layer.linear                     proj_out_2
=====================================  ==========================================================
"""

from __future__ import annotations

import argparse
import io
import math
import re
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from ddfast.errors import ModelError
from ddfast.io import write_bytes
from ddfast.models import (
    _SCALE,
    _difffit_sites,
    apply_difffit,
    difffit_scales,
    fold_difffit,
    make_dit,
    num_label_classes,
)

# The DiT paper's sizes: hidden width -> attention heads (a state dict does not record heads).
HEADS_BY_HIDDEN = {1152: 16, 1024: 16, 768: 12, 384: 6}
WEIGHTS = ("ema", "model")

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _pairs(depth: int) -> list[tuple[str, str]]:
    """(original, ddfast) names of every weight and bias except qkv, which is split in three."""
    names = [("x_embedder.proj", "pos_embed.proj"),
             ("t_embedder.mlp.0", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"),
             ("t_embedder.mlp.2", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2"),
             ("final_layer.adaLN_modulation.1", "proj_out_1"),
             ("final_layer.linear", "proj_out_2")]
    for i in range(depth):
        o, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        names += [(o + "attn.proj", d + "attn1.to_out.0"), (o + "mlp.fc1", d + "ff.net.0.proj"),
                  (o + "mlp.fc2", d + "ff.net.2"), (o + "adaLN_modulation.1", d + "norm1.linear")]
    return [(f"{o}.{kind}", f"{d}.{kind}") for o, d in names for kind in ("weight", "bias")]


_TABLE = ("y_embedder.embedding_table.weight",
          "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight")


def read_checkpoint(path: str | Path) -> dict:
    """The object in a ``.pt`` file, loaded with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"DiT checkpoint {path} does not exist; pass a .pt file in the original "
                         f"DiT layout or a diffusers folder")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise ModelError(f"cannot read {path} as a torch checkpoint of tensors ({exc}); pass a "
                         f"DiT state dict or a training checkpoint saved by torch.save") from exc
    if not isinstance(obj, dict):
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint "
                         f"dict with 'ema' / 'model'")
    return obj


def _state_of(obj: dict, weights: str, path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, args as a dict) of a loaded file, picking ``weights`` from a checkpoint."""
    if weights not in WEIGHTS:
        raise ModelError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    if "x_embedder.proj.weight" in obj:
        return obj, args
    if weights in obj and isinstance(obj[weights], dict):
        return obj[weights], args
    keys = sorted(obj)[:6]
    raise ModelError(f"{path} is neither a DiT state dict (x_embedder.proj.weight, blocks.0...) "
                     f"nor a checkpoint with {weights!r} weights; it holds {keys}")


def _heads(hidden: int, args: dict, heads: int | None, path) -> int:
    if heads:
        return int(heads)
    if args.get("num_heads"):
        return int(args["num_heads"])
    if hidden in HEADS_BY_HIDDEN:
        return HEADS_BY_HIDDEN[hidden]
    raise ModelError(f"{path}: a DiT of hidden size {hidden} is none of the paper's sizes, and "
                     f"its weights do not say how many attention heads it has; pass heads=N")


def _gamma_blocks(state: dict) -> list[int]:
    """The blocks that hold DiffFit scales in an original-layout state dict, sorted."""
    return sorted({int(m.group(1)) for name in state
                   if (m := _BLOCK.match(name)) and "gamma" in name.rsplit(".", 1)[-1]})


# Where each DiffFit scale of Minimax / the paper multiplies (their models.py), as (name within
# block i, indices into ``_difffit_sites`` of the block): attn.gamma1 (3H) the qkv output, bias
# included, before the split (so q, k, v); attn.gamma2 (H) the attention projection's output;
# gamma1 / gamma2 (H) the attention and MLP residual branches, beside the adaLN gate.
_GAMMA_SITES = (("attn.gamma1", (0, 1, 2)), ("attn.gamma2", (3,)), ("gamma1", (4,)),
                ("gamma2", (5,)))


def original_to_ddfast(state: dict[str, torch.Tensor], *, heads: int | None = None,
                       args: dict | None = None, path="the state dict") -> DiTTransformer2DModel:
    """ddfast's DiT holding the weights of an original-layout state dict (float32)."""
    args = args or {}
    need = ("x_embedder.proj.weight", "pos_embed", _TABLE[0], "final_layer.linear.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ModelError(f"{path} lacks {missing}: it is not an original-layout DiT state dict")
    w = state["x_embedder.proj.weight"]  # (H, C, p, p)
    hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    tokens = int(state["pos_embed"].shape[1])
    grid = math.isqrt(tokens)
    out_channels = int(state["final_layer.linear.weight"].shape[0]) // (patch * patch)
    classes = int(state[_TABLE[0]].shape[0]) - 1  # the last row is the null label
    dit = make_dit(depth=depth, hidden=hidden, heads=_heads(hidden, args, heads, path),
                   patch=patch, in_channels=in_channels, out_channels=out_channels,
                   sample_size=grid * patch, num_classes=classes)
    pairs = [*_pairs(depth), _TABLE]
    qkv = [f"blocks.{i}.attn.qkv.{kind}" for i in range(depth) for kind in ("weight", "bias")]
    absent = [o for o, _ in pairs if o not in state] + [k for k in qkv if k not in state]
    if absent:
        raise ModelError(f"{path} lacks {len(absent)} weights of a depth-{depth} DiT, e.g. "
                         f"{absent[:3]}: the file is truncated or not an original DiT")
    ours = dit.state_dict()
    new: dict[str, torch.Tensor] = {d: state[o] for o, d in pairs}
    for i in range(depth):
        for kind in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)  # (H, ...) each
            for part, t in zip(("to_q", "to_k", "to_v"), (q, k, v), strict=True):
                new[f"transformer_blocks.{i}.attn1.{part}.{kind}"] = t
    table = dit.pos_embed.pos_embed  # (1, T, H): a buffer, not saved; the original formula
    if tuple(state["pos_embed"].shape) != tuple(table.shape) or not torch.allclose(
            state["pos_embed"].float(), table, atol=1e-5):
        raise ModelError(f"{path}: its fixed position table differs from DiT's sin-cos table of a "
                         f"{grid}x{grid} grid; the file is not an original DiT")
    known = {o for o, _ in pairs} | set(qkv) | {"pos_embed"}
    extra = [k for k in state if k not in known and "gamma" not in k.rsplit(".", 1)[-1]]
    if extra:
        raise ModelError(f"{path} holds weights that the original DiT does not have: {extra[:4]}")
    for name, t in new.items():
        if name not in ours or tuple(ours[name].shape) != tuple(t.shape):
            raise ModelError(f"{path}: {name} has shape {tuple(t.shape)}, expected "
                             f"{tuple(ours[name].shape) if name in ours else 'no such weight'}")
    with torch.no_grad():
        params = dict(dit.named_parameters())
        for name, t in new.items():
            params[name].copy_(t.float())
    _attach_gammas(dit, state, path)
    return dit.eval()


def _attach_gammas(dit: DiTTransformer2DModel, state: dict, path) -> None:
    blocks = _gamma_blocks(state)
    if not blocks:
        return
    if blocks != list(range(len(blocks))):
        raise ModelError(f"{path}: DiffFit scales in blocks {blocks}, expected the first blocks")
    apply_difffit(dit, scale_blocks=len(blocks))
    hidden = dit.config.num_attention_heads * dit.config.attention_head_dim
    with torch.no_grad():
        for i in blocks:
            sites = _difffit_sites(dit.transformer_blocks[i])
            for suffix, where in _GAMMA_SITES:
                name = f"blocks.{i}.{suffix}"
                if name not in state:
                    raise ModelError(f"{path}: block {i} has DiffFit scales but lacks {name}")
                g = state[name].float().flatten()
                if g.numel() != hidden * len(where):
                    raise ModelError(f"{path}: {name} has {g.numel()} values, expected "
                                     f"{hidden * len(where)}")
                for part, k in zip(g.chunk(len(where)), where, strict=True):
                    getattr(sites[k][0], _SCALE).copy_(part)


def load_original(path: str | Path, *, weights: str = "ema",
                  heads: int | None = None) -> DiTTransformer2DModel:
    """ddfast's DiT from a ``.pt`` file in the original layout (see the module doc).

    ``weights`` picks ``ema`` (what DiT, Minimax and the paper sample with) or ``model`` from a
    training checkpoint; a plain state dict is taken as it is. ``heads`` is needed only for sizes
    outside the DiT paper's (the file records it when ``save_original`` wrote it)."""
    obj = read_checkpoint(path)
    state, args = _state_of(obj, weights, path)
    return original_to_ddfast(state, heads=heads, args=args, path=path)


def ddfast_to_original(dit: DiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a ddfast DiT (DiffFit scales folded in), float32."""
    plain = fold_difffit(dit) if difffit_scales(dit) else dit
    ours = {k: v.detach().float().cpu() for k, v in plain.state_dict().items()}
    depth = len(plain.transformer_blocks)
    state = {o: ours[d].clone() for o, d in [*_pairs(depth), _TABLE]}
    for i in range(depth):
        for kind in ("weight", "bias"):
            parts = [ours[f"transformer_blocks.{i}.attn1.{p}.{kind}"] for p in
                     ("to_q", "to_k", "to_v")]
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    state["pos_embed"] = plain.pos_embed.pos_embed.detach().float().cpu().clone()
    return state


def save_original(dit: DiTTransformer2DModel, path: str | Path, *, checkpoint: bool = False,
                  overwrite: bool = False) -> Path:
    """Write ``dit`` in the original layout: a plain state dict (what ``DiT-XL-2-256x256.pt``
    is), or with ``checkpoint`` DiT's training-checkpoint dict ``{"model", "ema", "args"}`` (both
    weights the same), whose ``args`` records the size so that any width loads back. Atomic."""
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise ModelError(f"{out} exists; pass overwrite to replace it, or choose another path")
    state = ddfast_to_original(dit)
    if checkpoint:
        cfg = dit.config
        args = {"num_heads": int(cfg.num_attention_heads),
                "image_size": int(cfg.sample_size), "num_classes": num_label_classes(dit),
                "depth": len(dit.transformer_blocks), "patch_size": int(cfg.patch_size),
                "learn_sigma": int(cfg.out_channels) == 2 * int(cfg.in_channels)}
        obj: dict = {"model": state, "ema": {k: v.clone() for k, v in state.items()},
                     "args": args}
    else:
        obj = state
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(out, buf.getvalue())
    return out


def is_original_checkpoint(spec: str) -> bool:
    """Whether a ``--dit`` value names a ``.pt`` / ``.pth`` file."""
    p = Path(spec).expanduser()
    return p.suffix in (".pt", ".pth") and p.is_file()


