"""SD3 text conditioning: prompt encoders (a real SD3/SD3.5 pipeline's text encoders, or a tiny random set
built locally for CPU smoke tests) and an on-disk cache of prompt embeddings.

The conditioning is exactly what diffusers' `StableDiffusion3Pipeline.encode_prompt` computes: we build a
`StableDiffusion3Pipeline` that holds only the six text components (transformer=None, vae=None) and call its
`encode_prompt` with classifier-free guidance off. Shapes:

- `prompt_embeds` (B, 77 + max_sequence_length, joint_attention_dim): CLIP-L and CLIP-G penultimate hidden
  states concatenated on channels, zero-padded to the T5 width, then concatenated on the sequence with the T5
  states (zeros when T5 is not used);
- `pooled_prompt_embeds` (B, pooled_projection_dim): concat of both CLIP projected text embeddings.

The tiny random components and the random-weight architectures (bench, FLOPs) are in `text_random.py`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import DavaeError, first_line
from ..latents import atomic_write_bytes
from .text_random import TINY_SPEC, TINY_VERSION, build_tiny_flux_text_components, build_tiny_sd3_text_components

logger = logging.getLogger(__name__)

TEXT_SUBFOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
GATED_HINT = (
    "SD3/SD3.5 weights are gated on the hub: accept the licence on huggingface.co and run "
    "`huggingface-cli login` on a machine with network access, or pass a local pipeline folder"
)


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
