"""SD3 prompt encoders (tiny random components) and the on-disk prompt-embedding cache."""

from __future__ import annotations

import pytest
import torch

from davae_cli.errors import DavaeError
from davae_cli.dit.text import (
    PromptCache,
    PromptEncoder,
    spec_identity,
)
from davae_cli.dit.text_random import build_tiny_sd3_text_components, save_tiny_sd3_text_components

MSL = 16  # T5 max_sequence_length: small keeps the tests fast
PROMPTS = ["a red cube on a table", "", "A photo of a dog!"]


@pytest.fixture(scope="module")
def tiny():
    return PromptEncoder.from_spec("tiny-random", max_sequence_length=MSL)


@pytest.fixture(scope="module")
def tiny_encoded(tiny):
    return tiny.encode(PROMPTS)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_sd3_text_components(tmp_path_factory.mktemp("sd3_text"))


def _no_encoder():
    raise AssertionError("the encoder must not be built when every prompt is cached")


def test_tiny_shapes_and_dims(tiny, tiny_encoded):
    embeds, pooled = tiny_encoded
    assert (tiny.joint_attention_dim, tiny.pooled_projection_dim, tiny.sequence_length) == (32, 32, 77 + MSL)
    assert embeds.shape == (len(PROMPTS), 77 + MSL, 32) and pooled.shape == (len(PROMPTS), 32)
    assert embeds.dtype == pooled.dtype == torch.float32
    assert torch.isfinite(embeds).all() and torch.isfinite(pooled).all()
    comps = build_tiny_sd3_text_components()
    h = comps["text_encoder"].config.hidden_size + comps["text_encoder_2"].config.hidden_size
    assert h < 32 and comps["text_encoder"].config.max_position_embeddings == 77
    assert embeds[:, :77, h:].abs().max() == 0  # CLIP states zero-padded to the T5 width
    assert embeds[:, 77:].abs().max() > 0


def test_tiny_is_deterministic_and_prompts_differ(tiny_encoded):
    embeds, pooled = tiny_encoded
    again = PromptEncoder.from_spec("tiny-random", max_sequence_length=MSL).encode(PROMPTS)
    assert torch.equal(again[0], embeds) and torch.equal(again[1], pooled)
    for i in range(len(PROMPTS)):
        for j in range(i + 1, len(PROMPTS)):
            assert not torch.allclose(embeds[i], embeds[j]) and not torch.allclose(pooled[i], pooled[j])
    other = build_tiny_sd3_text_components(seed=1)["text_encoder"].text_projection.weight
    assert not torch.equal(other, build_tiny_sd3_text_components()["text_encoder"].text_projection.weight)


def test_without_t5_zero_t5_block(tiny_encoded):
    embeds, pooled = tiny_encoded
    enc = PromptEncoder.from_spec("tiny-random", max_sequence_length=MSL, use_t5=False)
    e, p = enc.encode(PROMPTS)
    assert e.shape == embeds.shape and not enc.use_t5
    assert e[:, 77:].abs().max() == 0
    assert torch.equal(e[:, :77], embeds[:, :77]) and torch.equal(p, pooled)


def test_saved_folder_matches_in_memory(tiny_folder, tiny_encoded):
    enc = PromptEncoder.from_spec(str(tiny_folder), max_sequence_length=MSL)
    e, p = enc.encode(PROMPTS)
    assert torch.equal(e, tiny_encoded[0]) and torch.equal(p, tiny_encoded[1])
    assert enc.identity == spec_identity(str(tiny_folder)) and enc.identity.startswith(tiny_folder.name + "#")
    no_t5 = PromptEncoder.from_spec(str(tiny_folder), max_sequence_length=MSL, use_t5=False)
    assert no_t5.joint_attention_dim == 32 and no_t5.encode([""])[0][:, 77:].abs().max() == 0
    enc.unload()
    with pytest.raises(DavaeError):
        enc.encode(["x"])


def test_cache_round_trip_and_lazy_encoder(tmp_path, tiny, tiny_encoded):
    cache = PromptCache(tmp_path / "cache", tiny.identity, max_sequence_length=MSL, use_t5=True)
    assert cache.get(PROMPTS) == [None] * len(PROMPTS)
    built, seen = [], []

    def factory():
        built.append(1)
        return PromptEncoder.from_spec("tiny-random", max_sequence_length=MSL)

    cache.encode_cached(factory, PROMPTS + [PROMPTS[0]], batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert built == [1] and seen == [(2, 3), (3, 3)]
    assert not list(cache.folder.glob("*.tmp")) and len(list(cache.folder.glob("*.safetensors"))) == 3
    for i, prompt in enumerate(PROMPTS):
        e, p = cache.load(prompt)
        assert e.shape == (77 + MSL, 32) and p.shape == (32,)
        # other batch sizes than the reference encoding: equal up to float rounding of batched matmuls
        torch.testing.assert_close(e, tiny_encoded[0][i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p, tiny_encoded[1][i], rtol=1e-5, atol=1e-5)
    # put/load is bit-exact
    cache.put(PROMPTS, *tiny_encoded)
    got = cache.get([PROMPTS[1], "never seen"])
    assert torch.equal(got[0][0], tiny_encoded[0][1]) and torch.equal(got[0][1], tiny_encoded[1][1])
    assert got[1] is None
    e, p = cache.load_batch(PROMPTS)
    assert torch.equal(e, tiny_encoded[0]) and torch.equal(p, tiny_encoded[1])
    # everything cached: the factory is never called
    PromptCache(cache.folder, tiny.identity, max_sequence_length=MSL).encode_cached(_no_encoder, PROMPTS)
    with pytest.raises(DavaeError):
        cache.load("never seen")


def test_cache_keys_depend_on_identity_and_settings(tmp_path):
    base = PromptCache(tmp_path, "tiny-random:v1", max_sequence_length=MSL)
    keys = {
        base.key("a cat"),
        base.key(""),
        PromptCache(tmp_path, "other#0123456789abcdef", max_sequence_length=MSL).key("a cat"),
        PromptCache(tmp_path, "tiny-random:v1", max_sequence_length=MSL + 1).key("a cat"),
        PromptCache(tmp_path, "tiny-random:v1", max_sequence_length=MSL, use_t5=False).key("a cat"),
    }
    assert len(keys) == 5
    base.put(["a cat"], torch.ones(1, 77 + MSL, 4), torch.ones(1, 4))
    other = PromptCache(tmp_path, "other#0123456789abcdef", max_sequence_length=MSL)
    assert other.get(["a cat"]) == [None] and base.get(["a cat"])[0] is not None
    assert PromptCache.for_spec(tmp_path, "tiny-random", max_sequence_length=MSL).key("a cat") == base.key("a cat")


def test_cache_rejects_mismatched_encoder(tmp_path):
    cache = PromptCache(tmp_path, "tiny-random:v1", max_sequence_length=MSL + 1)
    with pytest.raises(DavaeError, match="does not match"):
        cache.encode_cached(lambda: PromptEncoder.from_spec("tiny-random", max_sequence_length=MSL), ["x"])


@pytest.mark.parametrize("kind", ["missing_dir", "not_pipeline", "hub"])
def test_unreadable_spec_gives_one_line_error(tmp_path, kind):
    spec = {
        "missing_dir": str(tmp_path / "no" / "such" / "pipeline"),
        "not_pipeline": str(tmp_path),
        "hub": "davae-test-nonexistent-owner/nonexistent-model",
    }[kind]
    with pytest.raises(DavaeError) as ei:
        PromptEncoder.from_spec(spec)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 600
    if kind == "hub":
        assert "huggingface-cli login" in msg and "local pipeline folder" in msg
    else:
        assert "folder" in msg
