"""SD3 text conditioning: prompt encoders (a real SD3/SD3.5 pipeline's text encoders, or a tiny random set
built locally for CPU smoke tests) and an on-disk cache of prompt embeddings.

The conditioning is exactly what diffusers' `StableDiffusion3Pipeline.encode_prompt` computes: we build a
`StableDiffusion3Pipeline` that holds only the six text components (transformer=None, vae=None) and call its
`encode_prompt` with classifier-free guidance off. Shapes:

- `prompt_embeds` (B, 77 + max_sequence_length, joint_attention_dim): CLIP-L and CLIP-G penultimate hidden
  states concatenated on channels, zero-padded to the T5 width, then concatenated on the sequence with the T5
  states (zeros when T5 is not used);
- `pooled_prompt_embeds` (B, pooled_projection_dim): concat of both CLIP projected text embeddings.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import DavaeError, first_line
from ..flops import counted_flops
from ..latents import atomic_write_bytes

logger = logging.getLogger(__name__)

TINY_SPEC = "tiny-random"
TINY_VERSION = "v1"  # bump when the tiny construction changes, so caches keyed on it are invalidated
CLIP_MAX_LENGTH = 77
TEXT_SUBFOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
GATED_HINT = (
    "SD3/SD3.5 weights are gated on the hub: accept the licence on huggingface.co and run "
    "`huggingface-cli login` on a machine with network access, or pass a local pipeline folder"
)


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


# ------------------------------------------------------------------------------------------------- identity


def _file_fingerprint(h: hashlib._Hash, path: Path, chunk: int = 1 << 20) -> None:
    """Size + full content for small files, size + first and last MiB for large ones (T5-XXL is ~9 GB)."""
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= 2 * chunk:
            h.update(f.read())
        else:
            h.update(f.read(chunk))
            f.seek(size - chunk)
            h.update(f.read(chunk))


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", "\\")) or (len(spec) > 1 and spec[1] == ":") or spec.count("/") > 1


def spec_identity(spec: str) -> str:
    """A string naming where prompt embeddings come from, computable without loading any model.

    `tiny-random` -> `tiny-random:v1`; a local folder -> `<folder name>#<16 hex>` where the hash covers the
    six text subfolders (file names, sizes, full content of small files, head/tail of weight files), so it
    does not depend on where the folder lives; anything else is a hub id -> `hub:<id>`.
    """
    if spec == TINY_SPEC:
        return f"{TINY_SPEC}:{TINY_VERSION}"
    p = Path(spec).expanduser()
    if p.is_dir():
        h = hashlib.sha256()
        for sub in TEXT_SUBFOLDERS:
            d = p / sub
            if not d.is_dir():
                continue
            for f in sorted(x for x in d.rglob("*") if x.is_file() and not x.name.startswith(".")):
                h.update(f"{f.relative_to(p).as_posix()}\0".encode())
                _file_fingerprint(h, f)
        return f"{p.resolve().name}#{h.hexdigest()[:16]}"
    return f"hub:{spec}"


# --------------------------------------------------------------------------------------------- prompt encoder


def _load_components(spec: str, use_t5: bool, dtype: torch.dtype) -> dict:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    p = Path(spec).expanduser()
    if p.exists() or _looks_like_path(spec):
        if not p.is_dir():
            raise DavaeError(f"text encoder source {spec!r} is not a folder: pass an SD3 pipeline folder, "
                             f"a hub id such as stabilityai/stable-diffusion-3.5-medium, or {TINY_SPEC!r}")
        need = [s for s in TEXT_SUBFOLDERS if use_t5 or not s.endswith("_3")]
        missing = [s for s in need if not (p / s).is_dir()]
        if missing:
            listed = ", ".join(m + "/" for m in missing)
            raise DavaeError(f"{spec!r} is not an SD3 pipeline folder (missing {listed}): pass the "
                             "folder of a downloaded SD3/SD3.5 pipeline (e.g. `huggingface-cli download "
                             "stabilityai/stable-diffusion-3.5-medium --local-dir DIR`)")
        src, where = str(p), "folder"
    else:
        src, where = spec, "hub"
    comps: dict = {}
    try:
        for name in ("text_encoder", "text_encoder_2"):
            comps[name] = CLIPTextModelWithProjection.from_pretrained(src, subfolder=name, dtype=dtype)
        for name in ("tokenizer", "tokenizer_2"):
            comps[name] = AutoTokenizer.from_pretrained(src, subfolder=name)
        if use_t5:
            comps["text_encoder_3"] = T5EncoderModel.from_pretrained(src, subfolder="text_encoder_3", dtype=dtype)
            comps["tokenizer_3"] = AutoTokenizer.from_pretrained(src, subfolder="tokenizer_3")
    except DavaeError:
        raise
    except Exception as e:
        if where == "hub":
            raise DavaeError(f"cannot load the SD3 text encoders of hub id {spec!r} ({first_line(e, 300, whole=True)}); "
                             f"{GATED_HINT}") from e
        raise DavaeError(f"cannot load the SD3 text encoders from folder {spec!r} ({first_line(e, 300, whole=True)}); "
                         "check that it is a complete diffusers SD3 pipeline folder") from e
    return comps


def _joint_dim_without_t5(spec: str) -> int:
    """SD3's T5 width when T5 is not loaded: transformer config, else text_encoder_3 config (no weights read)."""
    src = str(Path(spec).expanduser()) if Path(spec).expanduser().is_dir() else spec
    try:
        from diffusers import SD3Transformer2DModel

        return int(SD3Transformer2DModel.load_config(src, subfolder="transformer")["joint_attention_dim"])
    except Exception:  # noqa: BLE001 - no transformer/ (e.g. a text-only folder): T5 has the same width
        logger.debug("no transformer config for %s; reading text_encoder_3/config.json", spec)
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(src, subfolder="text_encoder_3").d_model)
    except Exception as e:
        raise DavaeError(f"cannot find joint_attention_dim for {spec!r} without T5 (no transformer/config.json or "
                         f"text_encoder_3/config.json: {first_line(e, 300, whole=True)}); {GATED_HINT}") from e


class PromptEncoder:
    """SD3 prompt encoder: `encode(prompts) -> (prompt_embeds (B, L, J), pooled (B, P))`, L = 77 + max_sequence_length.

    Wraps a `StableDiffusion3Pipeline` holding only the text components and calls its `encode_prompt`
    (no classifier-free duplication: encode "" yourself for the unconditional branch).
    """

    def __init__(self, components: dict, *, identity: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_sequence_length: int = 256,
                 joint_attention_dim: int | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        self.identity = identity
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = int(max_sequence_length)
        comps = {k: components.get(k) for k in TEXT_SUBFOLDERS}
        for k in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if comps[k] is not None:
                comps[k] = comps[k].to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.use_t5 = comps["text_encoder_3"] is not None
        if self.use_t5:
            self.joint_attention_dim = int(comps["text_encoder_3"].config.d_model)
        elif joint_attention_dim is None:
            raise ValueError("joint_attention_dim is required when there is no T5 text encoder")
        else:
            self.joint_attention_dim = int(joint_attention_dim)
        self.pooled_projection_dim = int(comps["text_encoder"].config.projection_dim
                                          + comps["text_encoder_2"].config.projection_dim)
        self._pipe = StableDiffusion3Pipeline(
            transformer=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(), **comps
        )
        if not self.use_t5:
            # encode_prompt reads the T5 width for its zero block from transformer.config.joint_attention_dim
            stub = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=self.joint_attention_dim))
            self._pipe.transformer = stub
        self.sequence_length = int(self._pipe.tokenizer_max_length) + self.max_sequence_length

    @classmethod
    def from_spec(cls, spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  use_t5: bool = True, max_sequence_length: int = 256) -> PromptEncoder:
        """`spec`: "tiny-random" (tiny random components, seed 0, J = P = 32: for CPU smoke tests only), a local
        SD3 pipeline folder, or a hub id (only the six text components are loaded)."""
        if spec == TINY_SPEC:
            comps = build_tiny_sd3_text_components()
            joint = comps["text_encoder_3"].config.d_model
            if not use_t5:
                comps["text_encoder_3"] = comps["tokenizer_3"] = None
        else:
            comps = _load_components(spec, use_t5, dtype)
            joint = None if use_t5 else _joint_dim_without_t5(spec)
        return cls(comps, identity=spec_identity(spec), device=device, dtype=dtype,
                   max_sequence_length=max_sequence_length, joint_attention_dim=joint)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B, 77 + max_sequence_length, J), pooled_prompt_embeds (B, P)) on the encoder's device."""
        if self._pipe is None:
            raise DavaeError("the prompt encoder was unloaded; build a new one to encode prompts")
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise DavaeError("prompts must be strings")
        if not prompts:
            kw = {"device": self.device, "dtype": self.dtype}
            return (torch.zeros(0, self.sequence_length, self.joint_attention_dim, **kw),
                    torch.zeros(0, self.pooled_projection_dim, **kw))
        embeds, _, pooled, _ = self._pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def unload(self) -> None:
        """Drop the text models (frees several GB for a real SD3.5); `encode` fails afterwards."""
        self._pipe = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ prompt cache


class PromptCache:
    """A folder of `<sha256>.safetensors` files (keys `prompt_embeds` (L, J), `pooled_prompt_embeds` (P)), one
    per prompt, keyed by sha256 of (encoder identity, max_sequence_length, use_t5, prompt text).

    Tensors are stored in the dtype the encoder produced (the dtype is not part of the key). The empty prompt
    "" is cached like any other (the unconditional / dropout embedding).
    """

    EMBEDS = "prompt_embeds"
    POOLED = "pooled_prompt_embeds"

    def __init__(self, folder: str | os.PathLike, identity: str, *, max_sequence_length: int = 256,
                 use_t5: bool = True):
        self.folder = Path(folder)
        self.identity = identity
        self.max_sequence_length = int(max_sequence_length)
        self.use_t5 = bool(use_t5)

    @classmethod
    def for_spec(cls, folder: str | os.PathLike, spec: str, *, max_sequence_length: int = 256,
                 use_t5: bool = True, kind: str = "sd3") -> PromptCache:
        """The cache for what `PromptEncoder.from_spec(spec, ...)` (`kind="flux"`: `FluxPromptEncoder`) would
        produce (no model is loaded)."""
        identity = spec_identity(spec) + ("" if kind == "sd3" else f"|{kind}")
        return cls(folder, identity, max_sequence_length=max_sequence_length, use_t5=use_t5)

    def key(self, prompt: str) -> str:
        payload = json.dumps([self.identity, self.max_sequence_length, self.use_t5, prompt], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def path(self, prompt: str) -> Path:
        return self.folder / f"{self.key(prompt)}.safetensors"

    def __contains__(self, prompt: str) -> bool:
        return self.path(prompt).is_file()

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct prompts (first-seen order) that have no entry yet."""
        return [p for p in dict.fromkeys(prompts) if p not in self]

    def _read(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            return t[self.EMBEDS], t[self.POOLED]
        except Exception as e:
            raise DavaeError(f"unreadable prompt cache entry {path} ({first_line(e, 300, whole=True)}); delete it and re-run") from e

    def get(self, prompts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """For each prompt, (embeds (L, J), pooled (P)) on the CPU, or None when not cached."""
        out: list = []
        for p in prompts:
            path = self.path(p)
            out.append(self._read(path) if path.is_file() else None)
        return out

    def put(self, prompts: Sequence[str], embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        """Store a batch: embeds (B, L, J), pooled (B, P); each entry is written atomically."""
        from safetensors.torch import save

        if embeds.ndim != 3 or pooled.ndim != 2 or not (len(prompts) == embeds.shape[0] == pooled.shape[0]):
            raise ValueError(f"expected {len(prompts)} prompts with embeds (B, L, J) and pooled (B, P); got "
                             f"{tuple(embeds.shape)} and {tuple(pooled.shape)}")
        meta = {"identity": self.identity, "max_sequence_length": str(self.max_sequence_length),
                "use_t5": str(self.use_t5)}
        for i, p in enumerate(prompts):
            tensors = {self.EMBEDS: embeds[i].detach().cpu().contiguous().clone(),
                       self.POOLED: pooled[i].detach().cpu().contiguous().clone()}
            atomic_write_bytes(self.path(p), save(tensors, metadata={**meta, "prompt": p}))

    def load(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (L, J), pooled (P)) of one cached prompt; DavaeError when it is not cached."""
        path = self.path(prompt)
        if not path.is_file():
            raise DavaeError(f"prompt {prompt[:60]!r} is not in the prompt cache {self.folder}; "
                             "precompute it with encode_cached")
        return self._read(path)

    def load_batch(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (B, L, J), (B, P) for cached prompts."""
        items = [self.load(p) for p in prompts]
        return torch.stack([e for e, _ in items]), torch.stack([q for _, q in items])

    def encode_cached(self, encoder_factory: Callable[[], PromptEncoder], prompts: Sequence[str], batch_size: int = 8,
                      progress: Callable[[int, int], None] | None = None) -> None:
        """Make sure every prompt is cached. The encoder is built (once, via `encoder_factory`) only if some prompt
        is missing, and unloaded afterwards. `progress(done, total)` is called after each batch of missing prompts.
        """
        todo = self.missing(prompts)
        if not todo:
            return
        encoder = encoder_factory()
        try:
            got = (encoder.identity, encoder.max_sequence_length, encoder.use_t5)
            want = (self.identity, self.max_sequence_length, self.use_t5)
            if got != want:
                raise DavaeError(f"the prompt encoder (identity, max_sequence_length, use_t5) = {got} does not match "
                                 f"the prompt cache's {want}")
            step = max(1, int(batch_size))
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                embeds, pooled = encoder.encode(chunk)
                self.put(chunk, embeds, pooled)
                if progress is not None:
                    progress(min(start + step, len(todo)), len(todo))
        finally:
            encoder.unload()


# --------------------------------------------------------------------------------------------- FLUX.1 prompts
FLUX_TEXT_SUBFOLDERS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


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


class FluxPromptEncoder:
    """FLUX.1 prompt encoder: `encode(prompts) -> (prompt_embeds (B, max_sequence_length, J), pooled (B, P))`,
    exactly `FluxPipeline.encode_prompt` (a FluxPipeline holding only the four text components): T5's last
    hidden states and CLIP's pooled output."""

    def __init__(self, components: dict, *, identity: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_sequence_length: int = 512):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        self.identity, self.device, self.dtype = identity, torch.device(device), dtype
        self.max_sequence_length = int(max_sequence_length)
        self.use_t5 = True  # FLUX.1 always conditions on T5
        comps = {k: components[k] for k in FLUX_TEXT_SUBFOLDERS}
        for k in ("text_encoder", "text_encoder_2"):
            comps[k] = comps[k].to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self._pipe = FluxPipeline(transformer=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(), **comps)

    @classmethod
    def from_spec(cls, spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  max_sequence_length: int = 512) -> "FluxPromptEncoder":
        """`spec`: "tiny-random" (the tiny components, CPU tests), a local FLUX.1 pipeline folder or a hub id."""
        if spec == TINY_SPEC:
            comps = build_tiny_flux_text_components()
        else:
            from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

            kw = {"torch_dtype": dtype}
            try:
                comps = {"text_encoder": CLIPTextModel.from_pretrained(spec, subfolder="text_encoder", **kw),
                         "text_encoder_2": T5EncoderModel.from_pretrained(spec, subfolder="text_encoder_2", **kw),
                         "tokenizer": AutoTokenizer.from_pretrained(spec, subfolder="tokenizer"),
                         "tokenizer_2": AutoTokenizer.from_pretrained(spec, subfolder="tokenizer_2")}
            except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
                raise DavaeError(f"cannot load FLUX.1's text encoders from {spec!r} ({first_line(e, 300, whole=True)}); pass a local "
                                 f"FLUX.1 pipeline folder (text_encoder, text_encoder_2, tokenizer, tokenizer_2)") from None
        return cls(comps, identity=spec_identity(spec) + "|flux", device=device, dtype=dtype,
                   max_sequence_length=max_sequence_length)

    unload = PromptEncoder.unload

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pipe is None:
            raise DavaeError("the prompt encoder was unloaded; build a new one to encode prompts")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, pooled, _ = self._pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                     num_images_per_prompt=1,
                                                     max_sequence_length=self.max_sequence_length)
        return embeds.to(self.dtype), pooled.to(self.dtype)


def text_encoder_flops(arch: str = "sd3", max_sequence_length: int = 256) -> int:
    """FLOPs of encoding one prompt with SD3's three text encoders (``davae_cli.dit.text.SD3_TEXT_ARCH``:
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

