"""Model construction, offline loading, diffusers round trip, DiffFit, EMA."""

import copy
import json

import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline

from ddfast.errors import ModelError, OutputError
from ddfast.models import (
    DIT_PRESETS,
    EMA,
    VAE_PRESETS,
    apply_difffit,
    build_dit,
    build_vae,
    check_compatible,
    count_parameters,
    difffit_scales,
    fold_difffit,
    load_dit,
    load_vae,
    null_label,
    num_label_classes,
    original_numerics,
    save_pipeline,
    set_trainable,
    vae_factor,
)


def perturb(model, seed=0, std=0.05):
    # A fresh DiT is adaLN-Zero: its output is exactly 0. Noise makes every path matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def micro(classes=10, channels=4, size=8, seed=0):
    return perturb(build_dit("micro", in_channels=channels, sample_size=size,
                             num_classes=classes), seed).eval()


def forward(dit, seed=1, labels=(0, 3, 9)):
    g = torch.Generator().manual_seed(seed)
    c, s = dit.config.in_channels, dit.config.sample_size
    x = torch.randn(len(labels), c, s, s, generator=g)
    t = torch.tensor([1, 500, 999, 250][:len(labels)])
    with torch.no_grad():
        return dit(x, timestep=t, class_labels=torch.tensor(labels), return_dict=False)[0]


def test_preset_table_is_the_dit_papers():
    paper = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
    for name, (depth, hidden, heads) in paper.items():
        p = DIT_PRESETS[f"{name}/2"]
        assert (p["depth"], p["hidden"], p["heads"], p["patch"]) == (depth, hidden, heads, 2)
    assert DIT_PRESETS["XL/4"]["patch"] == 4
    assert VAE_PRESETS["sd"]["block_out_channels"] == (128, 256, 512, 512)
    with pytest.raises(ModelError, match="presets are"):
        build_dit("XXL/2", in_channels=4, sample_size=8, num_classes=10)
    with pytest.raises(ModelError, match="multiple of 2"):
        build_dit("micro", in_channels=4, sample_size=7, num_classes=10)


@pytest.mark.parametrize("preset", ["tiny", "micro", "mini"])
def test_small_presets_forward_with_learned_variance(preset):
    torch.manual_seed(0)
    dit = build_dit(preset, in_channels=1, sample_size=8, num_classes=10).eval()
    assert torch.equal(forward(dit), torch.zeros(3, 2, 8, 8))  # adaLN-Zero, zero output layer
    out = forward(perturb(dit))
    assert out.shape == (3, 2, 8, 8) and out.abs().sum() > 0 and out.isfinite().all()
    assert len({id(b.norm1.emb) for b in dit.transformer_blocks}) == 1  # one shared embedder
    print(preset, count_parameters(dit))


def test_vae_presets():
    vae = build_vae("small", in_channels=1, sample_size=16)
    assert vae_factor(vae) == 2 and vae_factor(None) == 1
    z = vae.encode(torch.randn(2, 1, 16, 16)).latent_dist.mean
    assert z.shape == (2, 4, 8, 8) and vae.decode(z).sample.shape == (2, 1, 16, 16)
    with torch.device("meta"):
        sd = build_vae("sd", sample_size=256)
    assert vae_factor(sd) == 8 and sd.config.latent_channels == 4
    assert sd.config.scaling_factor == 0.18215
    assert count_parameters(sd) == 83_653_863  # the size of sd-vae-ft-ema / -mse


def test_null_label_and_no_label_dropout_inside_the_model():
    dit = micro()
    assert null_label(dit) == 10 and num_label_classes(dit) == 10
    assert dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11
    base = forward(dit)
    dit.train()  # diffusers would drop labels here at random; ddfast switched that off
    torch.testing.assert_close(forward(dit, labels=(0, 3, 9)), base, rtol=0, atol=0)
    assert not torch.allclose(forward(dit, labels=(10, 10, 10)), base, atol=1e-4)


def test_difffit_counts_of_dit_xl2():
    with torch.device("meta"):
        dit = build_dit("XL/2", in_channels=4, sample_size=32, num_classes=1000)
    total = count_parameters(dit)
    trainable = sum(p.numel() for p in apply_difffit(dit))
    print(f"DiT-XL/2: {total:,} parameters, DiffFit trains {trainable:,}")
    assert total == 674_834_720  # DiT's 675,129,632 less its fixed 256x1152 position table
    # biases: per block q, k, v, proj (4 x 1152), MLP (4608 + 1152), adaLN (6 x 1152); patch
    # embedding 1152; timestep MLP 2 x 1152; final adaLN 2 x 1152 and linear 2 x 2 x 8
    biases = 28 * (4 * 1152 + 4608 + 1152 + 6 * 1152) + 1152 + 2 * 1152 + 2 * 1152 + 32
    # + the class table (1000 classes + the null row) + scales (14 blocks x 6 sites x 1152)
    assert trainable == biases + 1001 * 1152 + 14 * 6 * 1152 == 1_739_552
    assert count_parameters(dit, trainable_only=True) == trainable


def test_difffit_trains_exactly_biases_class_table_and_scales():
    dit = micro()
    base = forward(dit)
    params = apply_difffit(dit)
    torch.testing.assert_close(forward(dit), base, rtol=0, atol=0)  # scales at 1 change nothing
    sites = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn1", "ff"]
    scales = {f"transformer_blocks.{i}.{s}.difffit_scale" for i in range(2) for s in sites}
    assert set(difffit_scales(dit)) == scales  # the first half of the 4 blocks
    want = {n for n, _ in dit.named_parameters()
            if n.endswith(".bias") or n.endswith("class_embedder.embedding_table.weight")}
    want |= scales
    got = {n for n, p in dit.named_parameters() if p.requires_grad}
    assert got == want
    assert sum("class_embedder" in n for n in got) == 1  # one tied table
    assert len(params) == len(got) and all(p.requires_grad for p in params)
    out = dit(torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 400]),
              class_labels=torch.tensor([1, 2]), return_dict=False)[0]
    out.square().mean().backward()
    for n, p in dit.named_parameters():
        assert (p.grad is not None) == (n in want), n
    for n in scales:
        assert dit.get_parameter(n).grad.abs().sum() > 0, n
    with pytest.raises(ModelError, match="already applied"):
        apply_difffit(dit)
    with pytest.raises(ModelError, match="scale_blocks"):
        apply_difffit(micro(), scale_blocks=5)
    assert len(difffit_scales(d := micro())) == 0 and len(set_trainable(d, "all")) == len(
        list(d.parameters()))
    with pytest.raises(ModelError, match="difffit"):
        set_trainable(d, "lora")


def test_fold_difffit_is_exact_and_copies_keep_their_own_scales():
    dit = micro()
    set_trainable(dit, "difffit")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in difffit_scales(dit).values():
            p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)
    hooked = forward(dit)
    assert not torch.allclose(hooked, forward(micro()), atol=1e-3)
    folded = fold_difffit(dit)
    assert not difffit_scales(folded)
    assert all(not m._forward_hooks for m in folded.modules())
    assert all(p.requires_grad for p in folded.parameters())
    torch.testing.assert_close(forward(folded), hooked, rtol=0, atol=1e-5)
    torch.testing.assert_close(forward(dit), hooked, rtol=0, atol=0)  # the original is untouched
    twin = copy.deepcopy(dit)  # its hooks must read its own scales, not the original's
    with torch.no_grad():
        for p in difffit_scales(twin).values():
            p.mul_(2.0)
    torch.testing.assert_close(forward(dit), hooked, rtol=0, atol=0)
    torch.testing.assert_close(forward(fold_difffit(twin)), forward(twin), rtol=0, atol=1e-5)


def test_save_pipeline_round_trip_through_dit_pipeline(tmp_path):
    dit = micro(classes=1000)  # DiTPipeline's guidance hard-codes the null label 1000
    vae = build_vae("small", in_channels=3, sample_size=16)
    out = save_pipeline(tmp_path / "pipe", dit, vae)
    assert {p.name for p in out.iterdir()} == {"model_index.json", "transformer", "vae",
                                               "scheduler"}
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = DiTPipeline.from_pretrained(str(out), local_files_only=True)
    # Plain diffusers reads the original eps from the config but keeps its own timestep divisor;
    # ddfast.models.original_numerics (what load_dit applies) restores the original's.
    assert pipe.transformer.config.norm_eps == 1e-6
    assert not torch.equal(forward(pipe.transformer), forward(dit))
    assert torch.equal(forward(original_numerics(pipe.transformer)), forward(dit))
    sched = pipe.scheduler.config
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.beta_start, sched.beta_end) == (
        1000, "linear", 1e-4, 0.02)
    images = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    for path in (out, out / "transformer"):  # a pipeline folder and a model folder
        loaded = load_dit(str(path))
        assert torch.equal(forward(loaded), forward(dit))
        assert len({id(b.norm1.emb) for b in loaded.transformer_blocks}) == 1  # tied again
    x = torch.randn(1, 3, 16, 16)
    for path in (out, out / "vae"):
        torch.testing.assert_close(load_vae(str(path)).encode(x).latent_dist.mean,
                                   vae.encode(x).latent_dist.mean)
    with pytest.raises(OutputError, match="overwrite=True"):
        save_pipeline(out, dit, vae)
    other = micro(classes=1000, seed=5)
    save_pipeline(out, other, vae, overwrite=True,
                  scheduler_config={"_class_name": "DDPMScheduler", "variance_type": "fixed_small"})
    assert torch.equal(forward(load_dit(str(out))), forward(other))
    assert isinstance(DiTPipeline.from_pretrained(str(out)).scheduler, DDPMScheduler)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temporary folder left
    with pytest.raises(ModelError, match="DDIMScheduler"):
        save_pipeline(tmp_path / "bad", dit, scheduler_config={"_class_name": "Euler"})


def test_save_without_vae_folds_difffit_and_loads_legacy_configs(tmp_path):
    dit = micro()
    apply_difffit(dit)
    with torch.no_grad():
        for p in difffit_scales(dit).values():
            p.uniform_(0.5, 1.5)
    save_pipeline(tmp_path / "m", dit)
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model_index.json", "transformer",
                                                            "scheduler"}
    loaded = load_dit(str(tmp_path / "m"))
    torch.testing.assert_close(forward(loaded), forward(dit), rtol=0, atol=1e-5)
    assert difffit_scales(dit)  # the caller's model keeps its scales
    # The facebook/DiT-XL-2-256 release names its class Transformer2DModel.
    cfg_path = tmp_path / "m" / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "Transformer2DModel"}))
    torch.testing.assert_close(forward(load_dit(str(tmp_path / "m"))), forward(loaded),
                               rtol=0, atol=0)


def test_loading_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist.*config.json"):
        load_dit(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="not a folder"):
        load_vae(str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json.*transformer/config.json"):
        load_dit(str(tmp_path / "empty"))
    save_pipeline(tmp_path / "p", micro(), build_vae("small", in_channels=3, sample_size=16))
    with pytest.raises(ModelError, match="holds a AutoencoderKL"):
        load_dit(str(tmp_path / "p" / "vae"))
    (tmp_path / "p" / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot load"):
        load_dit(str(tmp_path / "p"))
    (tmp_path / "p" / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weights"):
        load_dit(str(tmp_path / "p"))


def test_compatibility_errors():
    dit = micro(classes=10, channels=4, size=8)
    vae = build_vae("small", in_channels=3, sample_size=16)
    ok = dict(data_channels=3, num_classes=10, cond_labels=list(range(10)))
    check_compatible(dit, vae, resolution=16, **ok)
    with pytest.raises(ModelError, match="multiple of 4"):
        check_compatible(dit, vae, resolution=18, **ok)
    with pytest.raises(ModelError, match="resolution 16"):
        check_compatible(dit, vae, resolution=32, **ok)
    with pytest.raises(ModelError, match="in_channels=1"):
        check_compatible(dit, None, resolution=8, **{**ok, "data_channels": 1})
    with pytest.raises(ModelError, match="VAE takes 3-channel"):
        check_compatible(dit, vae, resolution=16, **{**ok, "data_channels": 1})
    with pytest.raises(ModelError, match="more classes or use fewer"):
        check_compatible(dit, vae, resolution=16, data_channels=3, num_classes=2,
                         cond_labels=[0, 207])
    pixel = micro(classes=10, channels=1, size=8)
    check_compatible(pixel, None, resolution=8, **{**ok, "data_channels": 1})


def test_ema_matches_a_hand_written_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    ema = EMA(model, decay=0.9)
    assert ema.names == ["0.weight", "0.bias", "1.bias"]
    want = [p.detach().clone() for p in ema.params]
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        want = [0.9 * w + 0.1 * p.detach() for w, p in zip(want, ema.params, strict=True)]
    for s, w in zip(ema.shadow, want, strict=True):
        torch.testing.assert_close(s, w)
    trained = [p.detach().clone() for p in ema.params]
    with ema.swap():
        torch.testing.assert_close(model[0].weight.detach(), want[0])
    torch.testing.assert_close(model[0].weight.detach(), trained[0], rtol=0, atol=0)
    other = copy.deepcopy(model)
    ema.copy_to(other)  # by name, into another instance
    torch.testing.assert_close(other[1].bias.detach(), want[2])
    assert torch.equal(other[1].weight, model[1].weight)
    plain = EMA([torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(4)),
                 torch.nn.Parameter(torch.zeros(2))])
    plain.load_state_dict(ema.state_dict())
    plain.copy_to()
    torch.testing.assert_close(plain.params[0].detach(), want[0])
    with pytest.raises(ModelError, match="another model"):
        plain.load_state_dict({"0": torch.zeros(1)})
    half = EMA([torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))], decay=0.9999)
    half.params[0].data.fill_(2.0)
    half.update()
    assert half.shadow[0].dtype == torch.float32 and half.shadow[0][0] > 1.0  # not lost to bf16
    with pytest.raises(ModelError, match="decay"):
        EMA([], decay=1.5)
