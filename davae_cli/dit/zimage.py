"""Z-Image (`ZImageTransformer2DModel`, `ZImagePipeline`): where everything Z-Image-specific lives;
`ZImageBackend` is registered as "zimage". Diffusers' `ZImageTransformer2DModel` (a single-stream DiT, Qwen3 captions), its zero-init
channel extension, the velocity in davae's sigma convention, `ZImagePipeline`'s sigma grid, CFG scale, prompt
encoder and an exact FLOP count.

Layout (diffusers 0.42 `transformer_z_image.py`):
- input: a list of per-sample latents (C, F=1, h, w). `_patchify_image` views (C, F/pF, pF, h/p, p, w/p, p) and
  permutes to tokens in (f, row, col) order with features (pF, i, j, c), channel fastest: feature
  ((i * p) + j) * C + c for pF = 1. A C + D latent therefore interleaves the new channels per patch position
  (old column (ij, c) -> ij (C + D) + c, `extend.output_row_index`), unlike FLUX's channel-major packing.
  `unpatchify` reads the final layer's p*p*C outputs in the same (i, j, c) order.
- sequences: image tokens and caption tokens are each padded to a multiple of 32 (SEQ_MULTI_OF) by repeating
  the last token, embedded, and the padding replaced by learned pad tokens (`x_pad_token`, `cap_pad_token`).
  The padding is NOT masked in attention (only batch padding is). A noise refiner (timestep-modulated, image
  tokens), a context refiner (unmodulated, caption tokens), then the main layers on [image; caption], the final
  layer on every token, and unpatchify of the image part.
- time: the model reads t in [0, 1] with t = 1 clean; `ZImagePipeline` passes (1000 - 1000 sigma) / 1000 and the
  model scales it by t_scale = 1000. It predicts x0 - eps (the pipeline negates it before its Euler step).
- captions: Qwen3's hidden_states[-2] of the chat-templated prompt, trimmed to the real tokens (variable length).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import DavaeError, first_line
from .diffusers_family import DiffusersBackend
from .extend import extend_output_head, output_row_index
from .text import PromptEncoder, spec_identity
from .text_random import TINY_SPEC

SEQ_MULTI_OF = 32  # transformer_z_image.SEQ_MULTI_OF: both token sequences are padded to a multiple of 32

# Tongyi-MAI/Z-Image-Turbo transformer/config.json. Every value equals ZImageTransformer2DModel.__init__'s
# default in diffusers 0.42.1 except axes_lens, whose default is (1024, 512, 512): 1536 is the value quoted by
# several independent copies of the hub config (not checked against the hub, which is unreachable here).
# 3840 / 30 = 128 = 32 + 48 + 48 head dims; cap_feat_dim 2560 = Qwen3-4B's hidden size; 64 = 2*2*16 inputs.
ZIMAGE_TURBO_CONFIG: dict = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
    "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": (32, 48, 48),
    "axes_lens": (1536, 512, 512),
}

# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json: static shift 3 (quoted by third-party ports; the
# pipeline's docstring example runs 9 steps at guidance 0). Unset keys are FlowMatchEulerDiscreteScheduler's
# defaults (base/max_image_seq_len 256/4096, base/max_shift 0.5/1.15: mu is computed but unused when static).
ZIMAGE_SCHEDULER_CONFIG: dict = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def load_zimage_transformer(spec: str, subfolder: Optional[str] = "transformer", arch: Optional[dict] = None,
                            seed: int = 0, dtype: torch.dtype = torch.float32, device=None):
    """`spec`: "random" (a new model from `arch`, seeded, built on `device`), a local folder (a transformer
    folder, or a pipeline folder with `subfolder`), or a hub id."""
    from diffusers import ZImageTransformer2DModel

    from .loader import load_transformer

    return load_transformer(ZImageTransformer2DModel, spec, subfolder, arch, seed=seed, dtype=dtype, device=device)


def _patch(model) -> tuple[int, int]:
    """(p, pF): the model's single spatial and temporal patch size."""
    ps, fs = tuple(model.config.all_patch_size), tuple(model.config.all_f_patch_size)
    if len(ps) != 1 or len(fs) != 1:
        raise DavaeError(f"Z-Image transformer: {len(ps)} patch sizes {ps}; davae supports exactly one")
    if int(fs[0]) != 1:
        raise DavaeError(f"Z-Image transformer: frame patch size {fs[0]}; images need 1")
    return int(ps[0]), int(fs[0])


def latent_channels(model) -> int:
    """C (or C + D) of the latent the transformer reads."""
    return int(model.config.in_channels)


def token_side(model) -> int:
    """Latent pixels per token side: the patch size p (`all_patch_size[0]`)."""
    return _patch(model)[0]


def extend_zimage(model, detail_channels: int):
    """The zero-init extension in Z-Image's (i, j, c) patch layout, in place (see the module doc): the embedder
    gains p*p*D zero input columns interleaved per patch position, the final layer's linear p*p*D zero rows
    (weight and bias) at the detail channels' unpatchify positions; config and attributes become C + D."""
    p, f = _patch(model)
    c, d = latent_channels(model), int(detail_channels)
    if d <= 0:
        raise DavaeError(f"detail channels must be positive, got {detail_channels}")
    key = f"{p}-{f}"
    old = model.all_x_embedder[key]
    if old.in_features != p * p * c:
        raise DavaeError(f"Z-Image x_embedder reads {old.in_features} features, expected p*p*C = {p * p * c}")
    new = nn.Linear(p * p * (c + d), old.out_features, bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    idx = output_row_index(p, c, d).to(old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, idx] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    model.all_x_embedder[key] = new
    final = model.all_final_layer[key]
    final.linear = extend_output_head(final.linear, p, c, d)
    model.in_channels = model.out_channels = c + d
    model.register_to_config(in_channels=c + d)
    return model


def zimage_velocity(model, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
    """The velocity eps - x0 of x (N, C[+D], h, w) at sigma (N,), same shape as x. cond: "embeds" (N, L, J)
    caption features padded to L, "mask" (N, L) (1 = a real token); each sample's caption is its masked rows.
    The timestep is passed as ZImagePipeline passes it, (1000 - sigma * 1000) / 1000 in float32, and the
    output negated (the model predicts x0 - eps)."""
    n, ch, h, w = x.shape
    p, f = _patch(model)
    if h % p or w % p:
        raise DavaeError(f"Z-Image patchifies {p}x{p} latent cells: the latent {h}x{w} must have sides "
                         f"divisible by {p}")
    reads = int(getattr(model, "in_channels", latent_channels(model)))  # a bench view's own heads, else the config
    if ch != reads:
        raise DavaeError(f"the Z-Image transformer reads {reads} latent channels, got {ch}")
    lens = list(model.config.axes_lens)
    if h // p > lens[1] or w // p > lens[2]:
        raise DavaeError(f"latent {h}x{w}: {h // p}x{w // p} tokens exceed the RoPE table ({lens[1]}x{lens[2]})")
    embeds, keep = cond["embeds"], cond["mask"].bool()
    if embeds.shape[0] != n or keep.shape != embeds.shape[:2]:
        raise DavaeError(f"caption embeds {tuple(embeds.shape)} / mask {tuple(keep.shape)} do not match {n} latents")
    dtype = next(iter(model.parameters())).dtype
    caps = [embeds[i][keep[i]].to(dtype) for i in range(n)]
    if min(len(c) for c in caps) == 0:
        raise DavaeError("a caption has no tokens (its mask is all 0)")
    if -(-max(len(c) for c in caps) // SEQ_MULTI_OF) * SEQ_MULTI_OF >= lens[0]:  # image rows sit after the caption
        raise DavaeError(f"captions of {max(len(c) for c in caps)} tokens exceed the RoPE table ({lens[0]})")
    t = sigma.to(device=x.device, dtype=torch.float32) * 1000.0  # the scheduler's timestep
    out = model(list(x.to(dtype).unsqueeze(2).unbind(0)), (1000.0 - t) / 1000.0, caps, patch_size=p,
                f_patch_size=f, return_dict=False)[0]
    return -torch.stack(out).squeeze(2).to(x.dtype)


def zimage_sigmas(steps: int, scheduler_config: Optional[dict] = None, image_tokens: Optional[int] = None,
                  shift: Optional[float] = None) -> torch.Tensor:
    """The `steps + 1` sigmas (float32, ending in 0) `ZImagePipeline.__call__` steps through: its default
    `linspace(1, 1/steps, steps)` through `FlowMatchEulerDiscreteScheduler.set_timesteps` (diffusers' own
    `retrieve_timesteps`) with `mu` from `calculate_shift(image_tokens)` (used only when shifting dynamically);
    `shift` replaces the config's static shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift, get_default_z_image_sigmas,
                                                              retrieve_timesteps)

    if steps < 1:
        raise DavaeError(f"steps must be >= 1, got {steps}")
    cfg = dict(ZIMAGE_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
    if cfg.get("stochastic_sampling"):
        raise DavaeError("the scheduler samples stochastically, which davae's ODE sampler does not reproduce")
    if shift is not None and not cfg.get("use_dynamic_shifting"):
        cfg["shift"] = float(shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    c, mu = sched.config, None
    if image_tokens is not None:
        mu = calculate_shift(image_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    elif c.get("use_dynamic_shifting"):
        raise DavaeError("the scheduler shifts dynamically: the image token count is needed")
    retrieve_timesteps(sched, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
    return sched.sigmas.detach().float().cpu()


def zimage_cfg_scale(guidance: float) -> float:
    """The w of davae's v_u + w (v_c - v_u) for ZImagePipeline's `guidance_scale` g: the pipeline combines
    pos + g (pos - neg), i.e. w = 1 + g. The pipeline applies CFG only for g > 0; g <= 0 is one conditional
    forward per step, w = 1 (skip the negative branch then). The pipeline's `cfg_normalization` (default False)
    and `cfg_truncation` (default 1.0: never truncates) are not supported."""
    return 1.0 + max(float(guidance), 0.0)


_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
                  "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def _tiny_tokenizer():
    """A byte-level Qwen2Tokenizer with no merges, Qwen's chat special tokens and a Qwen-style chat template
    (pad = <|endoftext|>), built offline."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({s: len(vocab) + k for k, s in enumerate(specials)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=_CHAT_TEMPLATE, model_max_length=4096)
    tok.add_tokens([AddedToken(s, special=True) for s in specials[1:]])
    return tok


def build_tiny_zimage_text_components(cap_feat_dim: int = 32, seed: int = 0) -> dict:
    """Tiny random Z-Image text components (no download), for CPU tests: `tokenizer` (a byte-level Qwen2Tokenizer
    with no merges, Qwen's chat special tokens and a Qwen-style chat template, pad = <|endoftext|>) and
    `text_encoder` (a 2-layer Qwen3Model, hidden = `cap_feat_dim`)."""
    from transformers import Qwen3Config, Qwen3Model

    tok = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = Qwen3Model(Qwen3Config(
            vocab_size=len(tok), hidden_size=cap_feat_dim, intermediate_size=2 * cap_feat_dim, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=max(cap_feat_dim // 2, 2),
            max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.pad_token_id))
    return {"text_encoder": te.eval().requires_grad_(False), "tokenizer": tok}


class ZImagePromptEncoder:
    """Z-Image prompt encoder: `encode(prompts) -> (embeds (B, max_sequence_length, J) zero-padded, mask (B,
    max_sequence_length) float)`: per prompt exactly the caption features `ZImagePipeline.encode_prompt` gives
    (a ZImagePipeline holding only the tokenizer and the Qwen3 text encoder), padded after the real tokens."""

    def __init__(self, components: dict, *, identity: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_sequence_length: int = 512):
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        self.identity, self.device, self.dtype = identity, torch.device(device), dtype
        self.max_sequence_length = int(max_sequence_length)
        self.use_t5 = True  # interface compatibility with the SD3/FLUX encoders; unused
        te = components["text_encoder"].to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self._pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=te,
                                    tokenizer=components["tokenizer"], transformer=None)

    @classmethod
    def from_spec(cls, spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  max_sequence_length: int = 512) -> "ZImagePromptEncoder":
        """`spec`: "tiny-random" (the tiny components), a local Z-Image pipeline folder or a hub id
        (`text_encoder` and `tokenizer` subfolders)."""
        if spec == TINY_SPEC:
            comps = build_tiny_zimage_text_components()
        else:
            path = Path(spec).expanduser()
            if (path.exists() or spec.startswith((".", "/", "~"))) and not all(
                    (path / s).is_dir() for s in ("text_encoder", "tokenizer")):
                raise DavaeError(f"{spec!r} is not a Z-Image pipeline folder (it needs text_encoder/ and tokenizer/)")
            from transformers import AutoTokenizer, Qwen3Model

            try:
                comps = {"text_encoder": Qwen3Model.from_pretrained(spec, subfolder="text_encoder", dtype=dtype),
                         "tokenizer": AutoTokenizer.from_pretrained(spec, subfolder="tokenizer")}
            except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
                raise DavaeError(f"cannot load Z-Image's text encoder from {spec!r} ({first_line(e, 200)}); pass a "
                                 f"local Z-Image pipeline folder (text_encoder, tokenizer)") from None
        return cls(comps, identity=spec_identity(spec) + "|zimage", device=device, dtype=dtype,
                   max_sequence_length=max_sequence_length)

    unload = PromptEncoder.unload  # drop the text model; `encode` fails afterwards

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pipe is None:
            raise DavaeError("the prompt encoder was unloaded; build a new one to encode prompts")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)  # a copy: the pipeline edits its list
        feats, _ = self._pipe.encode_prompt(prompts, device=self.device, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length)
        length, dim = self.max_sequence_length, feats[0].shape[-1]
        embeds = torch.zeros(len(feats), length, dim, device=self.device, dtype=self.dtype)
        mask = torch.zeros(len(feats), length, device=self.device)
        for i, ft in enumerate(feats):
            embeds[i, : len(ft)] = ft.to(self.dtype)
            mask[i, : len(ft)] = 1.0
        return embeds, mask


def zimage_flops(config: dict, image_tokens: int, text_tokens: int, batch: int = 1) -> dict:
    """FLOPs of one ZImageTransformer2DModel forward (matmuls as 2 m n k, attention QK^T + AV as 4 L^2 head_dim
    per head; elementwise work, norms and RoPE ignored), equal to FlopCounterMode's count. Both sequences are
    first padded to multiples of 32 (n, m), and the padding is computed on like real tokens: the x / caption
    embedders on n / m rows; timestep MLP 256 -> 1024 -> a = min(dim, 256) and the final modulation a -> dim on
    one row per sample; per block q, k, v, out (dim x dim) and the SwiGLU FFN dim -> 8 dim / 3 -> dim, plus the
    modulation a -> 4 dim per sample in modulated blocks: refiner blocks on the n image rows (modulated) and on
    the m caption rows, main layers on n + m; final linear dim -> p*p*C on n + m rows. For a batch whose captions
    differ in length pass the longest: exact but for the caption embedder, which runs on the unpadded concat."""
    pad = lambda k: -(-int(k) // SEQ_MULTI_OF) * SEQ_MULTI_OF  # noqa: E731
    mm = lambda m, k, n_: 2 * m * k * n_  # noqa: E731
    d, heads = int(config["dim"]), int(config["n_heads"])
    hd = d // heads
    inner, ff, a = hd * heads, int(d / 3 * 8), min(d, 256)
    p, pf = int(config["all_patch_size"][0]), int(config["all_f_patch_size"][0])
    feats = pf * p * p * int(config["in_channels"])
    r, layers, b = int(config["n_refiner_layers"]), int(config["n_layers"]), int(batch)
    n, m = pad(image_tokens), pad(text_tokens)

    def block(rows: int, modulated: bool) -> int:
        return 3 * mm(rows, d, inner) + mm(rows, inner, d) + 2 * mm(rows, d, ff) + mm(rows, ff, d) + (
            mm(b, a, 4 * d) if modulated else 0)

    parts = {
        "t_embedder": mm(b, 256, 1024) + mm(b, 1024, a),
        "x_embedder": mm(b * n, feats, d),
        "cap_embedder": mm(b * m, int(config["cap_feat_dim"]), d),
        "noise_refiner": r * block(b * n, True),
        "context_refiner": r * block(b * m, False),
        "layers": layers * block(b * (n + m), True),
        "final": mm(b, a, d) + mm(b * (n + m), d, feats),
    }
    attention = 4 * b * heads * hd * (r * n * n + r * m * m + layers * (n + m) ** 2)
    linear = sum(parts.values())
    return {"total": linear + attention, "attention": attention, "linear": linear, "image_tokens": int(image_tokens),
            "text_tokens": int(text_tokens), "padded_tokens": (n, m), "batch": b, "parts": parts}


# Qwen3-4B (Z-Image's text encoder, hidden size 2560 = cap_feat_dim): its config.json values, for random-weight
# speed runs and the text FLOPs; the tokenizer of a random run is the tiny one (the encoder always runs on
# max_sequence_length padded tokens, so the work does not depend on the vocabulary).
QWEN3_4B_CONFIG: dict = {
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}


class ZImageBackend(DiffusersBackend):
    """Z-Image (-Turbo): a single-stream DiT on 2x2 patches of the FLUX.1 VAE latent, Qwen3 captions of variable
    length (prompt tensors "embeds" + "mask"), CFG written pos + g (pos - neg) (w = 1 + g; Turbo samples at
    g = 0 without a negative branch), a static-shift grid."""

    name = "zimage"
    label = "Z-Image"
    transformer_class = "ZImageTransformer2DModel"
    prompt_keys = ("embeds", "mask")
    default_scheduler = ZIMAGE_SCHEDULER_CONFIG
    default_scheduler_name = "Z-Image-Turbo's scheduler_config"
    velocity = staticmethod(zimage_velocity)
    grid_limit_key = "axes_lens"

    @classmethod
    def config_token_side(cls, config: dict) -> int:
        sizes = config.get("all_patch_size") or (2,)
        return int(sizes[0])

    @classmethod
    def max_token_grid(cls, config: dict) -> Optional[int]:
        """The RoPE table's rows and columns (`axes_lens[1]`, `axes_lens[2]`; the first axis holds the caption):
        image token (i, j) reads row i of the one and column j of the other, so a grid may have at most that
        many tokens a side (the smaller of the two; they are equal in Z-Image's configs)."""
        lens = cls.config_value(config, "axes_lens")
        return min(int(lens[1]), int(lens[2]))

    @classmethod
    def widen_config(cls, config: dict, channels: int) -> dict:
        return {**config, "in_channels": channels}

    def extend(self, model, detail_channels: int):
        return extend_zimage(model, detail_channels)

    def heads(self, model, detail_channels: int):
        import copy

        wide = extend_zimage(copy.deepcopy(_heads_only(model)), detail_channels)  # the two layers, widened
        key = "{}-{}".format(*_patch(model))
        c = latent_channels(model) + detail_channels
        return ({f"all_x_embedder.{key}": wide.all_x_embedder[key],
                 f"all_final_layer.{key}.linear": wide.all_final_layer[key].linear},
                {"in_channels": c, "out_channels": c})

    @classmethod
    def sigma_grid(cls, steps, shift, scheduler_config, image_tokens):
        return zimage_sigmas(steps, scheduler_config or None, image_tokens, shift)

    @classmethod
    def cfg_weight(cls, guidance: float) -> float:
        return zimage_cfg_scale(guidance)

    @classmethod
    def prompt_encoder(cls, spec, *, device, dtype=torch.float32, use_t5=True, max_sequence_length=512):
        return ZImagePromptEncoder.from_spec(spec, device=device, dtype=dtype, max_sequence_length=max_sequence_length)

    def _tiny(self) -> bool:
        return self.preset.dit.text_encoders == TINY_SPEC

    def _random_text_components(self, device, dtype) -> dict:
        """The tiny pair for a tiny-random preset, else Qwen3-4B (random weights) behind the tiny tokenizer;
        on `device` in `dtype`."""
        if self._tiny():
            comps = build_tiny_zimage_text_components(int(self.preset.dit.arch.get("cap_feat_dim", 32)))
            comps["text_encoder"].to(device=device, dtype=dtype)
            return comps
        from transformers import Qwen3Config, Qwen3Model

        with torch.device(device):
            encoder = Qwen3Model(Qwen3Config(**QWEN3_4B_CONFIG)).to(dtype)
        return {"text_encoder": encoder.eval().requires_grad_(False), "tokenizer": _tiny_tokenizer()}

    def random_prompt_encoder(self, *, use_t5, device, dtype):
        """Qwen3-4B of its real architecture with random weights (the tiny one for a tiny-random preset)."""
        return ZImagePromptEncoder(self._random_text_components(device, dtype), identity="random", device=device,
                                   dtype=dtype, max_sequence_length=self.preset.dit.max_sequence_length)

    def random_condition(self, config, batch, device, dtype, generator):
        n = self.text_tokens()
        return {"embeds": torch.randn(batch, n, config["cap_feat_dim"], generator=generator).to(device, dtype),
                "mask": torch.ones(batch, n, device=device)}

    def random_text_encoders(self, device, dtype):
        enc = self._random_text_components(device, dtype)["text_encoder"].eval()
        n = self.preset.dit.max_sequence_length

        def run(prompts: int, g) -> None:
            ids = torch.randint(0, 1000, (prompts, n), generator=g).to(device)
            enc(input_ids=ids, output_hidden_states=True)  # every position attended (the pipeline pads to n)

        return run

    def text_flops(self) -> int:
        from ..flops import counted_flops

        run = self.random_text_encoders("meta", torch.float32)
        return counted_flops(run, 1, torch.Generator())

    @classmethod
    def flops(cls, config, image_tokens, text_tokens, batch=1):
        return zimage_flops(config, image_tokens, text_tokens, batch)


def _heads_only(model):
    """A stand-in holding only what `extend_zimage` touches (its config, embedder and final layer), so the
    widened heads are made without copying the trunk."""
    stub = nn.Module()
    stub.config = model.config
    stub.all_x_embedder, stub.all_final_layer = model.all_x_embedder, model.all_final_layer
    stub.register_to_config = lambda **kw: None
    return stub
