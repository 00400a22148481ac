"""The original DiT's numerics and checkpoint layout.

The oracle here is written from the DiT paper's equations (Peebles & Xie 2023: patchify, 2-D
sin-cos positions, adaLN-Zero blocks, the final adaLN layer, unpatchify) on original-layout
weights, in float64; it shares no code with ddfast or diffusers.
"""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from ddfast.dit_original import (
    ddfast_to_original,
    load_original,
    original_to_ddfast,
    save_original,
)
from ddfast.errors import ModelError
from ddfast.models import (
    apply_difffit,
    build_dit,
    difffit_scales,
    fold_difffit,
    load_dit,
    save_pipeline,
)

DEPTH, HIDDEN, HEADS, PATCH, CH, GRID, CLASSES = 3, 64, 4, 2, 4, 4, 10


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim / 2)), k < dim / 2."""
    k = torch.arange(dim // 2, dtype=torch.float64)
    w = 10000.0 ** (-k / (dim / 2))
    a = pos.double()[:, None] * w[None]
    return torch.cat([a.sin(), a.cos()], dim=1)


def pos_table(hidden: int, grid: int) -> torch.Tensor:
    """Token (row i, column j), index i * grid + j: the first half of the channels encodes j,
    the second half i (MAE's table, which DiT uses)."""
    i, j = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(hidden // 2, j.flatten()), sincos_1d(hidden // 2, i.flatten())],
                     dim=1)  # (T, H)


def timestep_features(t: torch.Tensor, dim: int = 256,
                      dtype=torch.float64) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)], f_k = exp(-ln(10000) k / (dim / 2)): the original's formula,
    in ``dtype`` (the original model computes it in float32 whatever its own dtype)."""
    half = dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype) / half)
    a = t.to(dtype)[:, None] * f[None]
    return torch.cat([a.cos(), a.sin()], dim=1)


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def original_forward(sd: dict, x, t, y, heads: int) -> torch.Tensor:
    """DiT forward on original-layout weights (float64): (N, C, S, S) -> (N, C_out, S, S)."""
    sd = {k: v.double() for k, v in sd.items()}
    lin = lambda name, h: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    n, _, s, _ = x.shape
    p = sd["x_embedder.proj.weight"].shape[-1]
    g = s // p
    hidden = sd["x_embedder.proj.weight"].shape[0]
    patches = x.double().reshape(n, -1, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    h = patches @ sd["x_embedder.proj.weight"].reshape(hidden, -1).T + sd["x_embedder.proj.bias"]
    # The original stores its position table as float32 and computes the timestep features in
    # float32 even in a float64 model; everything else runs in float64 here.
    h = h + pos_table(hidden, g).float().double()[None]  # (N, T, H)
    feats = timestep_features(t, dtype=torch.float32).double()  # (N, 256)
    temb = lin("t_embedder.mlp.2", F.silu(lin("t_embedder.mlp.0", feats)))
    c = temb + sd["y_embedder.embedding_table.weight"][y]  # (N, H)
    d = hidden // heads
    one = torch.ones((), dtype=torch.float64)
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))):
        b = f"blocks.{i}."
        # DiffFit scales of Minimax / the paper, where a block has them (else 1).
        qkv_s, proj_s, attn_s, mlp_s = (sd.get(b + n, one) for n in
                                        ("attn.gamma1", "attn.gamma2", "gamma1", "gamma2"))
        mod = lin(b + "adaLN_modulation.1", F.silu(c))[:, None]  # (N, 1, 6H)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        a = layer_norm(h) * (1 + sc1) + sh1
        qkv = lin(b + "attn.qkv", a) * qkv_s  # (N, T, 3H)
        q, k, v = qkv.reshape(n, -1, 3, heads, d).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v  # (N, nh, T, d)
        proj = lin(b + "attn.proj", att.transpose(1, 2).reshape(n, -1, hidden)) * proj_s
        h = h + attn_s * g1 * proj
        m = layer_norm(h) * (1 + sc2) + sh2
        h = h + mlp_s * g2 * lin(b + "mlp.fc2", F.gelu(lin(b + "mlp.fc1", m), approximate="tanh"))
    shift, scale = lin("final_layer.adaLN_modulation.1", F.silu(c))[:, None].chunk(2, dim=-1)
    out = lin("final_layer.linear", layer_norm(h) * (1 + scale) + shift)  # (N, T, p*p*Co)
    co = out.shape[-1] // (p * p)
    return out.reshape(n, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(n, co, g * p, g * p)


def random_original(seed=0, depth=DEPTH, hidden=HIDDEN, patch=PATCH, ch=CH, grid=GRID,
                    classes=CLASSES) -> dict:
    """An original-layout state dict with random weights (every path non-zero)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd = {"x_embedder.proj.weight": r(hidden, ch, patch, patch), "x_embedder.proj.bias": r(hidden),
          "pos_embed": pos_table(hidden, grid).float()[None],
          "t_embedder.mlp.0.weight": r(hidden, 256), "t_embedder.mlp.0.bias": r(hidden),
          "t_embedder.mlp.2.weight": r(hidden, hidden), "t_embedder.mlp.2.bias": r(hidden),
          "y_embedder.embedding_table.weight": r(classes + 1, hidden),
          "final_layer.adaLN_modulation.1.weight": r(2 * hidden, hidden),
          "final_layer.adaLN_modulation.1.bias": r(2 * hidden),
          "final_layer.linear.weight": r(patch * patch * 2 * ch, hidden),
          "final_layer.linear.bias": r(patch * patch * 2 * ch)}
    for i in range(depth):
        b = f"blocks.{i}."
        for name, (o, k) in {"attn.qkv": (3 * hidden, hidden), "attn.proj": (hidden, hidden),
                             "mlp.fc1": (4 * hidden, hidden), "mlp.fc2": (hidden, 4 * hidden),
                             "adaLN_modulation.1": (6 * hidden, hidden)}.items():
            sd[b + name + ".weight"], sd[b + name + ".bias"] = r(o, k), r(o)
    return sd


def inputs(seed=1, n=4, ch=CH, size=GRID * PATCH, classes=CLASSES):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ch, size, size, generator=g)
    t = torch.tensor([0, 1, 500, 999][:n])
    y = torch.tensor([0, 3, classes, 9][:n])  # the null label too
    return x, t, y


def noisy_micro(seed: int, difffit: bool = False):
    """ddfast's micro DiT with every weight perturbed (a fresh one outputs exactly zero)."""
    torch.manual_seed(seed)
    dit = build_dit("micro", in_channels=CH, sample_size=8, num_classes=CLASSES)
    if difffit:
        apply_difffit(dit)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dit


def ours(dit, x, t, y):
    with torch.no_grad():
        return dit(x, timestep=t, class_labels=y, return_dict=False)[0]


def test_timestep_embedding_is_the_closed_form():
    dit = build_dit("micro", in_channels=1, sample_size=8, num_classes=10)
    t = torch.tensor([0, 1, 17, 500, 999])
    got = dit.transformer_blocks[0].norm1.emb.time_proj(t).double()  # (5, 256)
    # float32 arguments t * f (t < 1000) round to 6e-5 at most: that bounds the error.
    torch.testing.assert_close(got, timestep_features(t), atol=1e-4, rtol=0)
    assert all(b.norm3.eps == 1e-6 for b in dit.transformer_blocks)
    assert dit.config.norm_eps == 1e-6


def test_loaded_dit_matches_the_original_forward_in_float64():
    sd = random_original()
    dit = original_to_ddfast(sd, heads=HEADS).double()
    x, t, y = inputs()
    want = original_forward(sd, x, t, y, HEADS)
    got = ours(dit, x.double(), t, y)
    assert want.shape == got.shape == (4, 2 * CH, GRID * PATCH, GRID * PATCH)
    err = (got - want).abs().max().item()
    assert err < 1e-6 * max(1.0, want.abs().max().item()), err


def test_the_diffusers_defaults_are_what_differs():
    # Without the original numerics the same weights give a visibly different forward.
    sd = random_original()
    dit = original_to_ddfast(sd, heads=HEADS).double()
    x, t, y = inputs()
    right = ours(dit, x.double(), t, y)
    for block in dit.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1
        block.norm3.eps = 1e-5
    assert (ours(dit, x.double(), t, y) - right).abs().max() > 1e-3


def test_built_and_saved_dits_keep_the_original_numerics(tmp_path):
    dit = noisy_micro(0)
    sd = ddfast_to_original(dit)
    x, t, y = inputs(size=8)
    want = original_forward(sd, x, t, y, heads=4)
    assert (ours(dit.double(), x.double(), t, y) - want).abs().max() < 1e-6
    save_pipeline(tmp_path / "m", dit.float())
    loaded = load_dit(tmp_path / "m").double()
    assert loaded.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 0
    assert (ours(loaded, x.double(), t, y) - want).abs().max() < 1e-6


def test_round_trip_through_the_original_layout(tmp_path):
    dit = noisy_micro(1)
    x, t, y = inputs(size=8)
    for checkpoint in (False, True):
        path = tmp_path / f"dit-{checkpoint}.pt"
        save_original(dit, path, checkpoint=checkpoint)
        back = load_original(path, heads=None if checkpoint else 4)
        assert torch.equal(ours(back, x, t, y), ours(dit, x, t, y))
        assert back.config.sample_size == 8 and back.config.num_embeds_ada_norm == CLASSES
    with pytest.raises(ModelError, match="exists"):
        save_original(dit, tmp_path / "dit-False.pt")
    with pytest.raises(ModelError, match="heads"):
        load_original(tmp_path / "dit-False.pt")  # hidden 128 is not a paper size


def test_difffit_is_folded_on_export_and_the_function_kept():
    dit = noisy_micro(2, difffit=True)
    x, t, y = inputs(size=8)
    back = original_to_ddfast(ddfast_to_original(dit), heads=4)
    assert not difffit_scales(back)
    torch.testing.assert_close(ours(back, x, t, y), ours(fold_difffit(dit), x, t, y))


def test_original_files_are_checked(tmp_path):
    sd = random_original()
    torch.save({"weights": sd}, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="neither a DiT state dict"):
        load_original(tmp_path / "odd.pt", heads=HEADS)
    bad = dict(sd, pos_embed=sd["pos_embed"] + 1)
    with pytest.raises(ModelError, match="position table"):
        original_to_ddfast(bad, heads=HEADS)
    truncated = {k: v for k, v in sd.items() if not k.startswith("blocks.1.mlp")}
    with pytest.raises(ModelError, match="lacks 4 weights of a depth-3 DiT"):
        original_to_ddfast(truncated, heads=HEADS)
    with pytest.raises(ModelError, match="does not have"):
        original_to_ddfast(dict(sd, **{"blocks.0.attn.extra": sd["pos_embed"]}), heads=HEADS)
    with pytest.raises(ModelError, match="does not exist"):
        load_original(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        load_original(tmp_path / "junk.pt")
    # DiT's training checkpoints keep args as an argparse.Namespace: weights_only allows it.
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(num_heads=HEADS)},
               tmp_path / "train.pt")
    x, t, y = inputs()
    torch.testing.assert_close(ours(load_original(tmp_path / "train.pt"), x, t, y),
                               ours(original_to_ddfast(sd, heads=HEADS), x, t, y))


def with_gammas(sd: dict, blocks: int, seed=3) -> dict:
    """A Minimax / paper fine-tuning state: DiffFit scales in the first ``blocks`` blocks."""
    g = torch.Generator().manual_seed(seed)
    hidden = sd["x_embedder.proj.weight"].shape[0]
    out = dict(sd)
    for i in range(blocks):
        for name, size in (("attn.gamma1", 3 * hidden), ("attn.gamma2", hidden),
                           ("gamma1", hidden), ("gamma2", hidden)):
            out[f"blocks.{i}.{name}"] = 1 + 0.3 * torch.randn(size, generator=g)
    return out


def test_minimax_checkpoint_scales_land_where_they_multiply(tmp_path):
    ema = with_gammas(random_original(), blocks=2)
    model = with_gammas(random_original(seed=5), blocks=2, seed=6)
    torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-S/2", num_heads=HEADS)},
               tmp_path / "0012000.pt")
    x, t, y = inputs()
    for weights, sd in (("ema", ema), ("model", model)):
        dit = load_original(tmp_path / "0012000.pt", weights=weights)
        assert len(difffit_scales(dit)) == 2 * 6  # q, k, v, proj, two residual branches
        want = original_forward(sd, x, t, y, HEADS)
        err = (ours(dit.double(), x.double(), t, y) - want).abs().max().item()
        assert err < 1e-6 * max(1.0, want.abs().max().item()), err
    # Out again: the scales fold into the weights, and the function is kept.
    back = original_to_ddfast(ddfast_to_original(load_original(tmp_path / "0012000.pt")),
                              heads=HEADS)
    torch.testing.assert_close(ours(back, x, t, y),
                               original_forward(ema, x, t, y, HEADS).float(),
                               atol=1e-4, rtol=1e-4)
    broken = dict(ema)
    del broken["blocks.1.gamma2"]
    with pytest.raises(ModelError, match="lacks blocks.1.gamma2"):
        original_to_ddfast(broken, heads=HEADS)


def test_the_job_samples_and_continues_from_a_minimax_checkpoint(tmp_path):
    """--dit FILE.pt: a paper-style checkpoint (pixel space, digits' 1 channel) fine-tunes on,
    its DiffFit scales trained further, then samples; the model/ folder loads in diffusers."""
    from diffusers import DiTTransformer2DModel

    from ddfast.config import resolve
    from ddfast.train import run

    sd = with_gammas(random_original(ch=1, grid=4, patch=2), blocks=2)
    torch.save({"ema": sd, "model": sd, "args": {"num_heads": HEADS}}, tmp_path / "ft.pt")
    before = load_original(tmp_path / "ft.pt")
    summary = run(resolve("smoke", {"run.out": str(tmp_path / "run"), "run.progress": "off",
                                    "model.dit": str(tmp_path / "ft.pt"), "optim.steps": "4",
                                    "sample.steps": "3", "eval.epochs": "1"}))
    after = load_dit(summary["model"])
    x, t, y = inputs(ch=1, size=8)
    moved = (ours(after, x, t, y) - ours(fold_difffit(before), x, t, y)).abs().max()
    assert 0 < moved < 1.0  # trained on, from the checkpoint's function
    plain = DiTTransformer2DModel.from_pretrained(summary["model"], subfolder="transformer")
    assert plain.config.norm_eps == 1e-6  # plain diffusers reads the original eps back
    assert len(list((tmp_path / "run" / "distilled").rglob("*.png"))) == 20


def test_convert_command_round_trip(tmp_path, capsys):
    from ddfast.convert import main

    dit = noisy_micro(4)
    save_pipeline(tmp_path / "m", dit)
    assert main(["to-original", str(tmp_path / "m"), str(tmp_path / "m.pt"), "--checkpoint"]) == 0
    assert main(["to-diffusers", str(tmp_path / "m.pt"), str(tmp_path / "back")]) == 0
    x, t, y = inputs(size=8)
    assert torch.equal(ours(load_dit(tmp_path / "back"), x, t, y), ours(dit, x, t, y))
    assert main(["to-original", str(tmp_path / "m"), str(tmp_path / "m.pt")]) == 2
    assert "exists" in capsys.readouterr().err
