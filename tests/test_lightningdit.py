"""LightningDiT backend: official state-dict layout, strict loading, zero-init warm start (SPEC §6)."""

import copy
import math

import pytest
import torch

from davae_cli import DavaeError
from davae_cli.dit.lightningdit import (
    LIGHTNINGDIT_SIZES,
    LightningDiT,
    build_lightningdit,
    extend_lightningdit,
    shift_time,
)
from davae_cli.dit.lightningdit_weights import load_lightningdit_weights

C = 4  # the tiny preset's latent channels


def tiny(seed: int = 0, **kw) -> LightningDiT:
    """A tiny model with every weight random (the from-scratch init zeroes adaLN and the output head,
    which would make the warm-start checks trivially true), scaled so that activations stay O(1)."""
    torch.manual_seed(seed)
    m = build_lightningdit("tiny", **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "pos_embed":
                continue
            if p.ndim > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return m.eval()


def inputs(model: LightningDiT, n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s = model.config.input_size
    x = torch.randn(n, model.in_channels, s, s, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, model.config.num_classes + 1, (n,), generator=g)  # includes the null class
    return x, t, y


# ---------------------------------------------------------------------------------------------------
# official layout


# Hand-written from the released checkpoint's module tree (hustvl/LightningDiT models/lightningdit.py:
# timm PatchEmbed `proj`, DiT TimestepEmbedder / LabelEmbedder, EVA VisionRotaryEmbeddingFast buffers,
# SwiGLUFFN w12/w3, RMSNorm `weight`, adaLN_modulation = Sequential(SiLU, Linear)).
OFFICIAL_GLOBAL_KEYS = [
    "pos_embed",
    "x_embedder.proj.weight", "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "feat_rope.freqs_cos", "feat_rope.freqs_sin",
    "final_layer.norm_final.weight",
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
]
OFFICIAL_BLOCK_KEYS = [
    "norm1.weight", "norm2.weight",
    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias",
    "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
]


def test_state_dict_has_exactly_the_official_key_names():
    sd = build_lightningdit("tiny").state_dict()
    expected = set(OFFICIAL_GLOBAL_KEYS) | {f"blocks.{i}.{k}" for i in range(2) for k in OFFICIAL_BLOCK_KEYS}
    assert set(sd) == expected


def test_xl1_shapes_match_the_released_imagenet256_model():
    with torch.device("meta"):
        m = build_lightningdit("XL/1")  # defaults = the released config: 16x16x32, SwiGLU, RoPE, RMSNorm
    sd = m.state_dict()
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["x_embedder.proj.weight"].shape == (1152, 32, 1, 1)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["feat_rope.freqs_cos"].shape == (256, 72)
    assert sd["blocks.27.mlp.w12.weight"].shape == (2 * 3072, 1152)
    assert sd["blocks.27.mlp.w3.weight"].shape == (1152, 3072)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6 * 1152, 1152)
    assert sd["final_layer.linear.weight"].shape == (32, 1152)
    assert "blocks.28.norm1.weight" not in sd and "blocks.0.attn.q_norm.weight" not in sd
    assert sum(p.numel() for p in m.parameters()) == 675_256_736  # "675M" in the paper
    assert {"XL/1", "XL/2", "L/1", "B/1", "B/2", "tiny"} <= set(LIGHTNINGDIT_SIZES)


def test_options_change_names_like_the_official_code():
    sd = build_lightningdit("tiny", use_qknorm=True, use_swiglu=False, use_rope=False, use_rmsnorm=False,
                            wo_shift=True, class_dropout_prob=0.0).state_dict()
    assert "blocks.0.attn.q_norm.weight" in sd and "blocks.0.attn.k_norm.bias" in sd  # LayerNorm(head_dim)
    assert "blocks.0.mlp.fc1.weight" in sd and "blocks.0.mlp.fc2.weight" in sd
    assert not any(k.startswith("feat_rope") or k.endswith("norm1.weight") for k in sd)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (4 * 64, 64)
    assert sd["y_embedder.embedding_table.weight"].shape == (10, 64)  # no null row without dropout


def test_fixed_tables_follow_the_published_formulas():
    m = build_lightningdit("tiny", input_size=4)  # 4x4 tokens, hidden 64, head dim 16
    pe = m.pos_embed[0].double()
    d = 64
    for row, col in [(0, 0), (1, 3), (3, 2)]:
        k = row * 4 + col
        for i in range(d // 4):
            w = 1.0 / 10000 ** (i / (d // 4))
            ref = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
            got = [pe[k, i], pe[k, d // 4 + i], pe[k, d // 2 + i], pe[k, 3 * d // 4 + i]]
            assert all(abs(float(a) - b) < 1e-6 for a, b in zip(got, ref))
    # RoPE: q.k after rotation depends only on the 2D offset between the tokens
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    rq = m.feat_rope(q.expand(1, 1, 16, 16))[0, 0]
    rk = m.feat_rope(k.expand(1, 1, 16, 16))[0, 0]
    dots = rq @ rk.T  # (16 query tokens, 16 key tokens)

    def tok(r, c):
        return r * 4 + c

    assert torch.allclose(dots[tok(0, 0), tok(1, 2)], dots[tok(2, 1), tok(3, 3)], atol=1e-5)
    assert torch.allclose(dots[tok(1, 1), tok(1, 1)], q @ k, atol=1e-5)
    assert not torch.allclose(dots[tok(0, 0), tok(1, 2)], dots[tok(0, 0), tok(2, 1)], atol=1e-3)
    # timestep embedding: [cos, sin] of the raw t (no x1000)
    e = m.t_embedder.timestep_embedding(torch.tensor([0.0, 0.5]), 256)
    assert torch.equal(e[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    assert abs(float(e[1, 128]) - math.sin(0.5)) < 1e-6


def test_learn_sigma_and_wrong_inputs_raise():
    with pytest.raises(DavaeError):
        build_lightningdit("tiny", learn_sigma=True)
    with pytest.raises(DavaeError):
        build_lightningdit("huge/3")
    m = tiny()
    with pytest.raises(DavaeError, match="expected x of shape"):  # another channel count
        m(torch.randn(1, C + 1, 8, 8), torch.rand(1), torch.tensor([0]))
    with pytest.raises(DavaeError, match="multiples of the patch size 2"):  # 9 is not a whole number of patches
        tiny(patch_size=2)(torch.randn(1, C, 8, 9), torch.rand(1), torch.tensor([0]))


def test_shift_time():
    t = torch.linspace(0, 1, 5)
    s = shift_time(t, 0.3)
    assert s[0] == 0 and s[-1] == 1 and bool((s[1:-1] < t[1:-1]).all())  # more steps near noise (t = 0)
    assert torch.allclose(shift_time(t, 1.0), t)
    sigma, big = 1 - t, 1 / 0.3  # the same schedule in the SD3 convention: shift 1/0.3 on sigma = 1 - t
    assert torch.allclose(1 - s, big * sigma / (1 + (big - 1) * sigma), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# loading


def test_official_pt_checkpoint_loads_with_ema_preferred(tmp_path):
    sd_model, sd_ema = tiny(seed=1).state_dict(), tiny(seed=2).state_dict()
    ckpt = {"model": sd_model, "ema": sd_ema, "opt": {"state": {}, "param_groups": []},
            "config": {"model": {"model_type": "LightningDiT-XL/1"}}}
    path = tmp_path / "lightningdit-tiny.pt"
    torch.save(ckpt, path)
    key = "blocks.1.mlp.w12.weight"
    assert not torch.equal(sd_model[key], sd_ema[key])

    m = load_lightningdit_weights(tiny(seed=3), path)
    assert torch.equal(m.state_dict()[key], sd_ema[key])
    m = load_lightningdit_weights(tiny(seed=3), path, prefer_ema=False)
    assert torch.equal(m.state_dict()[key], sd_model[key])

    # DDP prefixes; a bare state dict
    torch.save({"ema": {f"module.{k}": v for k, v in sd_ema.items()}}, tmp_path / "ddp.pt")
    m = load_lightningdit_weights(tiny(seed=3), tmp_path / "ddp.pt")
    assert all(torch.equal(a, sd_ema[k]) for k, a in m.state_dict().items())
    torch.save(sd_model, tmp_path / "bare.pth")
    m = load_lightningdit_weights(tiny(seed=3), tmp_path / "bare.pth")
    assert torch.equal(m.state_dict()[key], sd_model[key])


def test_safetensors_and_diffusers_folder_load(tmp_path):
    from safetensors.torch import save_file

    src = tiny(seed=5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    src.save_pretrained(str(tmp_path / "folder"))
    for p in (tmp_path / "w.safetensors", tmp_path / "folder"):
        m = load_lightningdit_weights(tiny(seed=6), p)
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_mismatched_state_dict_raises_one_line(tmp_path, change):
    sd = tiny().state_dict()
    if change == "missing":
        del sd["blocks.1.attn.proj.bias"]
        needle = "blocks.1.attn.proj.bias"
    elif change == "extra":
        sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)
        needle = "blocks.0.attn.q_norm.weight"
    else:
        sd["x_embedder.proj.weight"] = torch.zeros(64, 3 * C, 1, 1)
        needle = "x_embedder.proj.weight"
    torch.save({"ema": sd}, tmp_path / "bad.pt")
    target = tiny(seed=9)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(DavaeError) as err:
        load_lightningdit_weights(target, tmp_path / "bad.pt")
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded


def test_missing_file_and_unpicklable_checkpoint_raise(tmp_path):
    import argparse

    with pytest.raises(DavaeError, match="not found"):
        load_lightningdit_weights(tiny(), tmp_path / "nope.pt")
    sd = tiny().state_dict()
    torch.save({"ema": sd, "args": argparse.Namespace(a=1)}, tmp_path / "ns.pt")
    with pytest.raises(DavaeError, match="trust_pickle"):
        load_lightningdit_weights(tiny(), tmp_path / "ns.pt")
    load_lightningdit_weights(tiny(), tmp_path / "ns.pt", trust_pickle=True)


# ---------------------------------------------------------------------------------------------------
# warm start


@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("ratio", [1, 3])
def test_zero_init_extension_is_exactly_the_pretrained_function(patch, ratio):
    d = ratio * C
    orig = tiny(seed=11, patch_size=patch)
    keys_before = {k: tuple(v.shape) for k, v in orig.state_dict().items()}
    ext = extend_lightningdit(copy.deepcopy(orig), d)
    assert set(ext.state_dict()) == set(keys_before)  # no new module
    changed = {k for k, v in ext.state_dict().items() if tuple(v.shape) != keys_before[k]}
    assert changed == {"x_embedder.proj.weight", "final_layer.linear.weight", "final_layer.linear.bias"}
    assert ext.config.in_channels == C + d and ext.config.detail_channels == d and ext.in_channels == C + d

    x_base, t, y = inputs(orig, n=3, seed=patch * 10 + ratio)
    x_detail = 3.0 * torch.randn(3, d, 8, 8)
    with torch.no_grad():
        ref = orig(x_base, t, y)
        out = ext(torch.cat([x_base, x_detail], dim=1), t, y)
    assert out.shape == (3, C + d, 8, 8)
    assert (out[:, :C] - ref).abs().max().item() <= 1e-6  # bitwise equal on CPU (base slices run alone)
    assert torch.count_nonzero(out[:, C:]) == 0

    # the check can fail: perturbing the new zero weights changes both outputs
    with torch.no_grad():
        ext.x_embedder.proj.weight[:, C:].normal_(0, 0.3)
        rows = torch.tensor([q * (C + d) + c for q in range(patch * patch) for c in range(C, C + d)])
        ext.final_layer.linear.weight[rows] = torch.randn(len(rows), 64) * 0.3
        out2 = ext(torch.cat([x_base, x_detail], dim=1), t, y)
    assert (out2[:, :C] - ref).abs().max().item() > 1e-3
    assert (out2[:, C:]).abs().max().item() > 1e-3


def test_extended_model_round_trips_through_save_pretrained(tmp_path):
    ext = extend_lightningdit(tiny(seed=12, patch_size=2), 3 * C)
    ext.save_pretrained(str(tmp_path / "ext"))
    assert (tmp_path / "ext" / "diffusion_pytorch_model.safetensors").exists()
    back = LightningDiT.from_pretrained(str(tmp_path / "ext")).eval()
    assert back.config.in_channels == 4 * C and back.config.detail_channels == 3 * C
    x, t, y = inputs(ext, n=2, seed=3)
    with torch.no_grad():
        assert torch.equal(ext(x, t, y), back(x, t, y))


def test_class_dropout_only_in_training():
    m = tiny(class_dropout_prob=1.0)
    labels = torch.tensor([0, 3, 7, 9])
    table = m.y_embedder.embedding_table.weight
    null = table[10].expand(4, -1)
    with torch.no_grad():
        assert torch.equal(m.y_embedder(labels, train=True), null)
        assert torch.equal(m.y_embedder(labels, train=False), table[labels])
        forced = m.y_embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 0, 1]))
        assert torch.equal(forced[[0, 3]], null[:2]) and torch.equal(forced[[1, 2]], table[[3, 7]])
        # through forward: eval keeps labels (outputs depend on y), train drops all (outputs ignore y)
        x, t, _ = inputs(m, n=2)
        a, b = torch.tensor([1, 2]), torch.tensor([5, 6])
        m.eval()
        assert not torch.allclose(m(x, t, a), m(x, t, b))
        m.train()
        assert torch.equal(m(x, t, a), m(x, t, b))


def test_new_weights_get_gradients_and_checkpointing_matches():
    ext = extend_lightningdit(tiny(seed=13, patch_size=2), C).train()
    x, t, y = inputs(ext, n=2, seed=4)
    target = torch.randn(2, 2 * C, 8, 8)

    def grads():
        ext.zero_grad()
        torch.manual_seed(0)  # the same label dropout in both runs
        ((ext(x, t, y) - target) ** 2).mean().backward()
        return {k: p.grad.clone() for k, p in ext.named_parameters() if p.grad is not None}

    g = grads()
    assert g["x_embedder.proj.weight"][:, C:].abs().sum() > 0
    new_rows = torch.tensor([q * 2 * C + c for q in range(4) for c in range(C, 2 * C)])
    assert g["final_layer.linear.weight"][new_rows].abs().sum() > 0
    assert "pos_embed" not in g  # frozen, like the official model
    ext.enable_gradient_checkpointing()
    g2 = grads()
    assert set(g2) == set(g) and all(torch.allclose(g[k], g2[k], atol=1e-6) for k in g)
