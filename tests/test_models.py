"""Model construction, offline loading, diffusers round trip, DiffFit, EMA."""

import pytest
import torch
from diffusers import DiTPipeline

from ddfast.errors import ModelError, OutputError
from ddfast.models import (
    EMA,
    apply_difffit,
    build_dit,
    build_vae,
    check_compatible,
    count_parameters,
    fold_difffit,
    load_dit,
    load_vae,
    null_label,
    save_pipeline,
)


def micro(classes=10, channels=4, size=8, seed=0):
    torch.manual_seed(seed)
    dit = build_dit("micro", in_channels=channels, sample_size=size, num_classes=classes)
    with torch.no_grad():  # diffusers zero-initialises the output layers; make outputs non-trivial
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return dit.eval()


def forward(dit, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, s = dit.config.in_channels, dit.config.sample_size
    x = torch.randn(3, c, s, s, generator=g)
    with torch.no_grad():
        return dit(x, timestep=torch.tensor([1, 500, 999]), class_labels=torch.tensor([0, 3, 9]),
                   return_dict=False)[0]


def test_presets_build_and_output_learned_variance():
    dit = micro()
    assert forward(dit).shape == (3, 8, 8, 8)
    assert null_label(dit) == 10
    emb = {id(b.norm1.emb) for b in dit.transformer_blocks}
    assert len(emb) == 1  # one shared timestep/class embedder, as in the original DiT
    vae = build_vae("small", in_channels=1, sample_size=16)
    assert vae.encode(torch.randn(1, 1, 16, 16)).latent_dist.mean.shape == (1, 4, 8, 8)


def test_difffit_parameter_count_of_dit_xl2():
    with torch.device("meta"):
        dit = build_dit("XL/2", in_channels=4, sample_size=32, num_classes=1000)
    trainable = apply_difffit(dit)
    n_train = sum(p.numel() for p in trainable)
    n_total = count_parameters(dit) - sum(p.numel() for p in dit.difffit_scales.values())
    # method.md: about 1.7 M trainable of about 675 M
    assert 670e6 < n_total < 680e6, n_total
    assert 1.6e6 < n_train < 1.8e6, n_train


def test_difffit_trains_exactly_biases_class_table_and_scales():
    dit = micro()
    base = forward(dit)
    apply_difffit(dit)
    torch.testing.assert_close(forward(dit), base)  # scales at 1 change nothing
    names = [n for n, p in dit.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".bias") or "class_embedder" in n
                         or n.startswith("difffit_scales.") for n in names)
    assert sum("class_embedder" in n for n in names) == 1
    assert len([n for n in names if n.startswith("difffit_scales.")]) == 6 * 2  # half of 4 blocks
    out = dit(torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 4]),
              class_labels=torch.tensor([1, 2]), return_dict=False)[0]
    out.square().mean().backward()
    for n, p in dit.named_parameters():
        if p.requires_grad:
            continue
        assert p.grad is None, n
    assert dit.difffit_scales["b0_q"].grad.abs().sum() > 0
    with pytest.raises(ModelError, match="already"):
        apply_difffit(dit)


def test_fold_difffit_is_exact():
    dit = micro()
    apply_difffit(dit)
    with torch.no_grad():
        for p in dit.difffit_scales.values():
            p.copy_(torch.rand_like(p) + 0.5)
    hooked = forward(dit)
    folded = fold_difffit(dit)
    assert not hasattr(folded, "difffit_scales")
    torch.testing.assert_close(forward(folded), hooked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, forward(micro()), atol=1e-3)


def test_save_load_round_trip_and_dit_pipeline(tmp_path):
    dit = micro(classes=1000)
    vae = build_vae("small", in_channels=3, sample_size=16)
    save_pipeline(tmp_path / "pipe", dit, vae)
    pipe = DiTPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    torch.testing.assert_close(forward(pipe.transformer), forward(dit))
    torch.testing.assert_close(forward(load_dit(str(tmp_path / "pipe"))), forward(dit))
    torch.testing.assert_close(forward(load_dit(str(tmp_path / "pipe" / "transformer"))),
                               forward(dit))
    loaded_vae = load_vae(str(tmp_path / "pipe"))
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded_vae.encode(x).latent_dist.mean,
                               vae.encode(x).latent_dist.mean)
    with pytest.raises(OutputError, match="exists"):
        save_pipeline(tmp_path / "pipe", dit, vae)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temporary folder left


def test_save_without_vae_and_loading_errors(tmp_path):
    dit = micro()
    save_pipeline(tmp_path / "m", dit)
    torch.testing.assert_close(forward(load_dit(str(tmp_path / "m"))), forward(dit))
    with pytest.raises(ModelError, match="does not exist"):
        load_dit(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_dit(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="fold"):
        d2 = micro()
        apply_difffit(d2)
        save_pipeline(tmp_path / "x", d2)


def test_compatibility_errors():
    dit = micro(classes=10, channels=4, size=8)
    vae = build_vae("small", in_channels=3, sample_size=16)
    check_compatible(dit, vae, resolution=16, data_channels=3, num_classes=10,
                     cond_labels=list(range(10)))
    with pytest.raises(ModelError, match="multiple of 4"):
        check_compatible(dit, vae, resolution=18, data_channels=3, num_classes=10,
                         cond_labels=list(range(10)))
    with pytest.raises(ModelError, match="--resolution 16"):
        check_compatible(dit, vae, resolution=32, data_channels=3, num_classes=10,
                         cond_labels=list(range(10)))
    with pytest.raises(ModelError, match="input channels"):
        check_compatible(dit, None, resolution=8, data_channels=1, num_classes=10,
                         cond_labels=list(range(10)))
    with pytest.raises(ModelError, match="label table"):
        check_compatible(dit, vae, resolution=16, data_channels=3, num_classes=10,
                         cond_labels=[0, 207])


def test_ema_matches_a_hand_written_loop():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    ema = EMA(params, decay=0.9)
    want = [p.detach().clone() for p in params]
    for _ in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.update()
        want = [0.9 * w + 0.1 * p.detach() for w, p in zip(want, params, strict=True)]
    for s, w in zip(ema.shadow, want, strict=True):
        torch.testing.assert_close(s, w)
    other = EMA([torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5))])
    other.load_state_dict(ema.state_dict())
    other.copy_to()
    torch.testing.assert_close(other.params[0].detach(), want[0])
