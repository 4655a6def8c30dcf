"""Text encoders built in code, with random weights: the tiny SD3 / FLUX.1 text components behind the
`tiny-random` spec (CPU tests; no download), and the real SD3 / FLUX.1 architectures for timing
(`davae bench --text-encoders`) and FLOP counts. Loading real encoders and encoding prompts is `text.py`'s.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import DavaeError
from ..flops import counted_flops

TINY_SPEC = "tiny-random"
TINY_VERSION = "v1"  # bump when the tiny construction changes, so caches keyed on it are invalidated
CLIP_MAX_LENGTH = 77


# --------------------------------------------------------------------------------------------- tiny components


def _tiny_clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges (256 byte chars + their `</w>` forms + 2 specials)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(d) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tok = CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=CLIP_MAX_LENGTH)
    return tok


def _tiny_t5_tokenizer():
    """A character-level T5-style (Unigram + Metaspace, `</s>` appended, pad id 0) tokenizer."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = sorted(set(string.printable) - set(string.whitespace))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -1.0) for c in chars]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def tiny_sd3_text_dims(joint_attention_dim: int = 32, pooled_projection_dim: int = 32) -> dict:
    """Hidden/projection sizes of the tiny CLIP-L/CLIP-G stand-ins for the given SD3 transformer dims."""
    h1 = 2 * max(2, joint_attention_dim // 8)
    h2 = 2 * max(2, joint_attention_dim // 4)
    p1 = pooled_projection_dim // 2
    p2 = pooled_projection_dim - p1
    if h1 + h2 > joint_attention_dim or p1 < 1:
        raise ValueError(
            f"tiny SD3 text components need joint_attention_dim >= {h1 + h2} and pooled_projection_dim >= 2"
        )
    return {"clip_hidden": (h1, h2), "clip_projection": (p1, p2), "t5_d_model": joint_attention_dim}


def build_tiny_sd3_text_components(
    joint_attention_dim: int = 32, pooled_projection_dim: int = 32, seed: int = 0
) -> dict:
    """Tiny, random-initialised SD3 text components (deterministic for a given seed, no download).

    Returns the six pipeline components `text_encoder`, `text_encoder_2` (CLIPTextModelWithProjection),
    `text_encoder_3` (T5EncoderModel), `tokenizer`, `tokenizer_2` (byte-level CLIPTokenizer, 77 tokens) and
    `tokenizer_3` (character-level T5 tokenizer). The CLIP projection dims sum to `pooled_projection_dim`,
    the CLIP hidden sizes sum to at most `joint_attention_dim`, and T5's d_model is `joint_attention_dim`.
    For CPU smoke tests only: the embeddings carry no meaning.
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    dims = tiny_sd3_text_dims(joint_attention_dim, pooled_projection_dim)
    tok = _tiny_clip_tokenizer()
    tok_2 = _tiny_clip_tokenizer()
    tok_3 = _tiny_t5_tokenizer()
    bos, eos = tok.convert_tokens_to_ids("<|startoftext|>"), tok.convert_tokens_to_ids("<|endoftext|>")

    def clip(hidden: int, proj: int) -> CLIPTextModelWithProjection:
        cfg = CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=proj,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act="gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        )
        return CLIPTextModelWithProjection(cfg)

    t5_cfg = T5Config(
        vocab_size=len(tok_3), d_model=joint_attention_dim, d_kv=8, d_ff=2 * joint_attention_dim,
        num_layers=2, num_decoder_layers=0, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = clip(dims["clip_hidden"][0], dims["clip_projection"][0])
        torch.manual_seed(seed + 1)
        te_2 = clip(dims["clip_hidden"][1], dims["clip_projection"][1])
        torch.manual_seed(seed + 2)
        te_3 = T5EncoderModel(t5_cfg)
    for m in (te, te_2, te_3):
        m.eval().requires_grad_(False)
    return {
        "text_encoder": te, "text_encoder_2": te_2, "text_encoder_3": te_3,
        "tokenizer": tok, "tokenizer_2": tok_2, "tokenizer_3": tok_3,
    }


# The architectures of SD3 / SD3.5's three text encoders (the `text_encoder*/config.json` of the
# stabilityai pipelines: CLIP ViT-L/14's text tower, OpenCLIP ViT-bigG/14's, T5 v1.1 XXL's encoder), for
# random-weight speed measurements (`davae bench --text-encoders`) and FLOP counts. No weights, no tokenizers.
SD3_TEXT_ARCH: dict = {
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
                     "vocab_size": 49408, "max_position_embeddings": 77},
    "text_encoder_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu",
                       "vocab_size": 49408, "max_position_embeddings": 77},
    "text_encoder_3": {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
                       "feed_forward_proj": "gated-gelu", "vocab_size": 32128,
                       "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128},
}


def build_sd3_text_encoders(arch: str = "sd3", device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32) -> dict:
    """The three SD3 text encoders with random weights, built directly on `device` (`meta` for FLOP counts):
    `arch` "sd3" = the real architectures (SD3_TEXT_ARCH, about 5.6 B parameters), "flux" = FLUX.1's two
    (CLIP-L without projection, T5-XXL), "tiny" = the tiny set."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if arch == "tiny":
        comps = build_tiny_sd3_text_components()
        return {k: comps[k].to(device=device, dtype=dtype) for k in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    if arch == "tiny-flux":  # keyed like the SD3 set: text_encoder_3 is the T5 (run on max_sequence_length tokens)
        comps = build_tiny_flux_text_components()
        return {"text_encoder": comps["text_encoder"].to(device=device, dtype=dtype),
                "text_encoder_3": comps["text_encoder_2"].to(device=device, dtype=dtype)}
    if arch == "flux":  # FLUX.1: CLIP-L's pooled output (CLIPTextModel, no projection) and T5-XXL
        from transformers import CLIPTextModel

        with torch.device(device):
            out = {"text_encoder": CLIPTextModel(CLIPTextConfig(**SD3_TEXT_ARCH["text_encoder"])),
                   "text_encoder_3": T5EncoderModel(T5Config(**SD3_TEXT_ARCH["text_encoder_3"], num_decoder_layers=0,
                                                             is_encoder_decoder=False, use_cache=False))}
        return {k: m.to(dtype=dtype).eval().requires_grad_(False) for k, m in out.items()}
    if arch != "sd3":
        raise DavaeError(f"{arch}: text encoder architecture must be sd3, flux, tiny or tiny-flux")
    with torch.device(device):
        out = {"text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**SD3_TEXT_ARCH["text_encoder"])),
               "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SD3_TEXT_ARCH["text_encoder_2"])),
               "text_encoder_3": T5EncoderModel(T5Config(**SD3_TEXT_ARCH["text_encoder_3"], num_decoder_layers=0,
                                                         is_encoder_decoder=False, use_cache=False))}
    return {k: m.to(dtype=dtype).eval().requires_grad_(False) for k, m in out.items()}


def run_sd3_text_encoders(encoders: dict, prompts: int, max_sequence_length: int, generator=None) -> None:
    """One forward of each encoder on `prompts` random token sequences of the pipeline's lengths (77 CLIP
    tokens, `max_sequence_length` T5 tokens): the work `StableDiffusion3Pipeline.encode_prompt` does after
    tokenising, for timing and FLOP counting."""
    for name, m in encoders.items():
        n = max_sequence_length if name == "text_encoder_3" else CLIP_MAX_LENGTH
        dev = next(m.parameters()).device
        ids = torch.randint(0, int(m.config.vocab_size), (prompts, n), generator=generator).to(dev)
        if name == "text_encoder_3":
            m(ids)
        else:
            m(ids, output_hidden_states=True)


def save_tiny_sd3_text_components(folder: str | os.PathLike, **kw: Any) -> Path:
    """Write the tiny components in the diffusers pipeline layout (`text_encoder/`, ..., `tokenizer_3/`),
    each loadable with `from_pretrained(folder, subfolder=...)`. `kw` goes to `build_tiny_sd3_text_components`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, comp in build_tiny_sd3_text_components(**kw).items():
        comp.save_pretrained(str(folder / name))
    return folder


def build_tiny_flux_text_components(joint_attention_dim: int = 32, pooled_projection_dim: int = 16,
                                    seed: int = 0) -> dict:
    """Tiny random FLUX.1 text components (no download): `text_encoder` (CLIPTextModel, hidden =
    `pooled_projection_dim`: FLUX's pooled vector is CLIP's pooler output), `text_encoder_2` (T5EncoderModel,
    d_model = `joint_attention_dim`), `tokenizer` (byte-level CLIP, 77 tokens), `tokenizer_2` (character-level
    T5). For CPU tests only."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, tok_2 = _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    bos, eos = tok.convert_tokens_to_ids("<|startoftext|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=pooled_projection_dim, intermediate_size=2 * pooled_projection_dim,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu",
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
        torch.manual_seed(seed + 1)
        te_2 = T5EncoderModel(T5Config(
            vocab_size=len(tok_2), d_model=joint_attention_dim, d_kv=8, d_ff=2 * joint_attention_dim, num_layers=2,
            num_decoder_layers=0, num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    for m in (te, te_2):
        m.eval().requires_grad_(False)
    return {"text_encoder": te, "text_encoder_2": te_2, "tokenizer": tok, "tokenizer_2": tok_2}


def text_encoder_flops(arch: str = "sd3", max_sequence_length: int = 256) -> int:
    """FLOPs of encoding one prompt with SD3's three text encoders (``davae_cli.dit.text_random.SD3_TEXT_ARCH``:
    CLIP-L and CLIP-G on 77 tokens, T5-XXL on ``max_sequence_length``; ``arch="flux"``: FLUX.1's CLIP-L and
    T5-XXL), counted on the meta device."""
    encoders = build_sd3_text_encoders(arch, device="meta")
    return counted_flops(run_sd3_text_encoders, encoders, 1, max_sequence_length)


class ClipT5Text:
    """For a backend whose prompts go through CLIP (+ T5) encoders of `SD3_TEXT_ARCH`: which architecture its
    preset uses (`text_arch`, or `tiny_text_arch` for a tiny-random preset), those encoders with random weights
    for timing, and their FLOPs per prompt. Mixed in before the backend's base class."""

    text_arch = "sd3"
    tiny_text_arch = "tiny"

    def _text_arch(self) -> str:
        return self.tiny_text_arch if self.preset.dit.text_encoders == TINY_SPEC else self.text_arch

    def random_text_encoders(self, device, dtype):
        enc = build_sd3_text_encoders(self._text_arch(), device, dtype)
        return lambda prompts, g: run_sd3_text_encoders(enc, prompts, self.preset.dit.max_sequence_length, g)

    def text_flops(self) -> int:
        return text_encoder_flops(self._text_arch(), self.preset.dit.max_sequence_length)

