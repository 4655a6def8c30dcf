"""The `Backend` protocol: everything that differs between DiT families, in one class per family.

Each family implements it in its own module under `dit/` (`sd3.SD3Backend`, `flux.FluxBackend`,
`lightningdit.LightningDiTBackend`, ...) and is named by one line of `dit/registry.py`; a preset's
`dit.backend` picks it. Code outside `dit/` asks the backend and never names a family.

What a backend answers:
- architecture from a config dict, no model built: `config_channels` (C the DiT reads), `config_token_side`
  (latent pixels per token side), `max_token_grid` (the most tokens a side its table of positions covers; None:
  any grid), `model_class`;
- loading: `load` (hub id, folder, file, "random", tiny), `load_adapted` (an exported folder), `extend` (the
  zero-init channel extension), `heads` (the input/output layers of a configuration, for bench's shared trunk);
- the forward: `velocity(model, x, sigma, cond)` always returns eps - x0 in the sigma convention of
  `davae_cli.flow` (sigma = 1 is noise); each family converts its own timestep/sign convention;
- sampling: `sigma_grid` (its pipeline's grid), `scheduler_config` (and where it came from), `guidance_mode`
  ("cfg": a negative branch, "distilled": the scale is a model input, "none"), `cfg_weight` (the pipeline's
  guidance scale -> w of v_u + w (v_c - v_u)), `guidance_inputs`;
- conditioning: `conditioning` ("prompt" | "class"), `prompt_keys`, `prompt_encoder`, `random_prompt_encoder`,
  `random_condition` (tensors of the right shapes, for speed), `random_text_encoders` and `text_flops`,
  `text_tokens`;
- training: `prepare_training` (LoRA targets or everything), `export`, `training_inputs`;
- cost: `flops` (one forward, checked against torch's counter in the tests);
- the unmodified model: `native_model` (a `davae_cli.sampling.SamplingModel`).
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from ..errors import DavaeError
from ..exports import FACTS_FILE  # noqa: F401  (the sampling facts beside an adapted model)
from .registry import REGISTRY, backend_names

if TYPE_CHECKING:
    from ..config_schema import Preset
    from ..sampling import SamplingModel



def place_frozen(module: nn.Module, device, dtype) -> nn.Module:
    """Move an inference-only module to `device`, cast it unless float32 (diffusers warns on a no-op cast),
    and freeze it."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype)
    return module.eval().requires_grad_(False)


def shared_trunk_view(model: nn.Module, layers: dict[str, nn.Module], attrs: Optional[dict] = None) -> nn.Module:
    """A shallow copy of `model` that shares every parameter and buffer of `model` except the submodules at
    the dotted paths of `layers`, which the copy (and only the copy) uses instead. `model` is not changed.

    bench uses it to hold one trunk for two configurations (each its own patch embedder and output head), so
    the largest architectures fit once in memory and no attribute is swapped under a compiled graph. This is
    the one place that touches torch's module internals (`_modules`): each module on a replaced path is
    copied shallowly with its own child table."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    for path, layer in layers.items():
        *parents, leaf = path.split(".")
        node = view
        for name in parents:
            child = copy.copy(node._modules[name])
            child._modules = dict(child._modules)
            node._modules[name] = child
            node = child
        if leaf not in node._modules:
            raise DavaeError(f"{type(model).__name__} has no submodule {path!r}")
        node._modules[leaf] = layer
    for key, value in (attrs or {}).items():  # plain attributes the forward reads (e.g. out_channels)
        object.__setattr__(view, key, value)
    return view


class Backend:
    """A DiT family. Subclasses set the class attributes and implement what their family needs; the
    defaults here are the common case (a diffusers-style `in_channels`/`patch_size` config, CFG)."""

    name: str = ""
    conditioning: str = "prompt"  # "prompt" (text encoders) or "class" (labels with a null class)
    prompt_keys: tuple[str, str] = ("embeds", "pooled")  # the two per-prompt tensors of its prompt encoder
    label: str = ""  # how users call it, for messages ("SD3", "FLUX.1", ...)
    token_note: str = ""  # what a token is, when it is not one patch of the latent (for messages)

    def __init__(self, preset: "Preset"):
        self.preset = preset

    # ------------------------------------------------------------------------------------ architecture
    @classmethod
    def model_class(cls) -> type:
        raise NotImplementedError

    @classmethod
    def config_channels(cls, config: dict) -> int:
        """C (or C + D) of the latent the DiT with this config reads."""
        return int(config["in_channels"])

    @classmethod
    def config_token_side(cls, config: dict) -> int:
        """Latent pixels per token side."""
        return int(config.get("patch_size", 1) or 1)

    @classmethod
    def max_token_grid(cls, config: dict) -> Optional[int]:
        """The most tokens a side of the token grid the DiT with this config can read (a table of positions of
        that size), or None when any grid works (positions computed for the grid given). Read from the config
        alone: `read_max_token_grid` asks it of an adapted folder before any weight is loaded."""
        return None

    grid_limit_key: str = ""  # the config key `max_token_grid` reads, for messages

    @classmethod
    def grid_limit_phrase(cls, side: int) -> str:
        """How messages name the family's grid limit of `side` tokens."""
        key = f" ({cls.grid_limit_key})" if cls.grid_limit_key else ""
        return f"this {cls.label or cls.name} transformer's positions reach {side} tokens a side{key}"

    @classmethod
    def config_value(cls, config: dict, key: str):
        """`config[key]`, or when the file leaves it out the model class's default (what loading it would use)."""
        if key in config:
            return config[key]
        import inspect

        return inspect.signature(cls.model_class().__init__).parameters[key].default

    @classmethod
    def widen_config(cls, config: dict, channels: int) -> dict:
        """`config` with the DiT reading and writing `channels` latent channels (for the FLOP model)."""
        return {**config, "in_channels": channels, "out_channels": channels}

    def channels(self, model) -> int:
        return self.config_channels(dict(model.config))

    def patch_size(self, model) -> int:
        return self.config_token_side(dict(model.config))

    def arch_config(self) -> dict:
        """The full config of the preset's architecture (`dit.arch` over the model class's defaults), built
        on the meta device (no memory)."""
        with torch.device("meta"):
            return dict(self.load("random", device="meta").config)

    # ------------------------------------------------------------------------------------------ loading
    def load(self, spec: str, seed: int = 0, dtype=torch.float32, device=None,
             latent_side: Optional[int] = None) -> nn.Module:
        """The pretrained DiT: "random" (from `dit.arch`, seeded, built on `device`), a local folder or
        file, or a hub id. `latent_side`: the token grid when the family's model depends on it."""
        raise NotImplementedError

    @classmethod
    def load_adapted(cls, folder: Path, dtype=torch.float32) -> nn.Module:
        return cls.model_class().from_pretrained(str(folder), torch_dtype=dtype)

    def extend(self, model, detail_channels: int):
        """The zero-init extension to C + D channels, in place (SPEC §6)."""
        raise NotImplementedError

    def check_grid(self, model, side: int, granularity: int, downsample: int) -> None:
        """One line when `model` cannot read a `side` x `side` latent (a family built for one token grid)."""

    def heads(self, model, detail_channels: int) -> tuple[dict[str, nn.Module], dict]:
        """({dotted path: layer}, {attribute: value}): the input and output layers (and the attributes the
        forward reads) of the configuration with `detail_channels` more channels (0: the model's own)."""
        raise NotImplementedError

    def configuration(self, model, detail_channels: int) -> nn.Module:
        """The configuration with `detail_channels` more channels as a module sharing `model`'s trunk."""
        return shared_trunk_view(model, *self.heads(model, detail_channels))

    def bench_models(self, spec: str, seed: int, device, dtype, res: int) -> dict[str, nn.Module]:
        """{"native": module, "davae": module} for `davae bench` at `res`: one trunk, two sets of heads."""
        model = place_frozen(self.load(spec, seed=seed, device=device), device, dtype)
        return {"native": model,
                "davae": place_frozen(self.configuration(model, self.preset.vae.detail_channels), device, dtype)}

    @staticmethod
    def velocity(model, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- sampling
    @classmethod
    def sigma_grid(cls, steps: int, shift: Optional[float], scheduler_config: Optional[dict],
                   image_tokens: Optional[int]) -> torch.Tensor:
        """`steps + 1` sigmas from noise to 0: the grid of the family's pipeline (SPEC §6)."""
        from ..flow import sampling_sigmas

        return sampling_sigmas(steps, 1.0 if shift is None else shift).float()

    @classmethod
    def scheduler_config(cls, spec: Optional[str]) -> tuple[Optional[dict], str]:
        """(the scheduler config to sample with, where it came from); None: the family has none."""
        return None, ""

    @classmethod
    def guidance_mode(cls, config: dict) -> str:
        return "cfg"

    @classmethod
    def cfg_weight(cls, guidance: float) -> float:
        """w of v_u + w (v_c - v_u) for the pipeline's guidance scale (the same number by default)."""
        return float(guidance)

    @classmethod
    def guidance_inputs(cls, guidance: float, batch: int, device) -> dict:
        """Extra conditioning of a guidance-distilled model (the scale as an input)."""
        return {}

    # ------------------------------------------------------------------------------------- conditioning
    @classmethod
    def prompt_encoder(cls, spec: str, *, device, dtype=torch.float32, use_t5: bool = True,
                       max_sequence_length: int = 256):
        """An encoder of the text encoders in `spec` (pipeline folder, hub id or "tiny-random"):
        `encode(prompts) -> (tensor, tensor)` named by `prompt_keys`, `identity`, `unload()`."""
        raise DavaeError(f"{cls.label or cls.name} models are class-conditional: they take no prompts")

    def random_prompt_encoder(self, *, use_t5: bool, device, dtype):
        """The preset's text encoders with random weights behind local tokenizers (speed only)."""
        raise DavaeError(f"is for text-to-image presets; {self.preset.name} is a {self.label or self.name} preset",
                         param="random_weights")

    def prompt_cache_kind(self) -> str:
        return self.name

    def use_t5(self) -> bool:
        """Whether the prompt embeddings include T5's (a switch of SD3; other families always do)."""
        return True

    def prompt_cache(self, folder: Path):
        """The run's prompt-embedding cache for the preset's text encoders (no model is loaded)."""
        from .text import PromptCache

        d = self.preset.dit
        return PromptCache.for_spec(folder, d.text_encoders, max_sequence_length=d.max_sequence_length,
                                    use_t5=self.use_t5(), kind=self.prompt_cache_kind())

    def text_tokens(self) -> int:
        """Text tokens the DiT attends to per prompt (0 for class-conditional families)."""
        return 0

    def random_condition(self, config: dict, batch: int, device, dtype, generator: torch.Generator) -> dict:
        """Conditioning tensors of the right shapes with random values (bench: speed does not depend on them)."""
        raise NotImplementedError

    def random_text_encoders(self, device, dtype) -> Optional[Callable[[int, torch.Generator], None]]:
        """`run(prompts, generator)` encoding that many random prompts with the preset's text encoders
        (random weights), or None when the family has none."""
        return None

    def text_flops(self) -> int:
        """FLOPs of encoding one prompt (0 without text encoders)."""
        return 0

    # ----------------------------------------------------------------------------------------- training
    def prepare_training(self, model) -> list[str]:
        """Make the trainable parameters trainable (LoRA on the preset's targets, or everything); returns
        their names."""
        model.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]

    def export(self, model, folder: Path) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)

    def training_inputs(self, batch: int, device) -> dict:
        """Extra per-sample inputs of a training forward (a distilled model's guidance scale)."""
        return {}

    def sampling_facts(self, model, dit_spec: str) -> dict:
        """What sampling an adapted model needs besides the common facts (its scheduler config)."""
        return {}

    # --------------------------------------------------------------------------------------------- cost
    @classmethod
    def flops(cls, config: dict, image_tokens: int, text_tokens: int, batch: int = 1) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- native
    def native_model(self, spec: Optional[str], *, res: Optional[int], vae_dir: Optional[str],
                     shift: Optional[float], recipe: dict, device, dtype,
                     on_message: Callable[[str], None] = lambda t: None) -> "SamplingModel":
        """The unmodified base model at `res` under its own sampling settings (`generate --native`)."""
        raise NotImplementedError


def backend_class(name: str) -> type[Backend]:
    """The family registered as `name` (a preset's dit.backend, or an adapted model's facts)."""
    if name not in REGISTRY:
        raise DavaeError(f"unknown DiT backend {name!r} ({', '.join(backend_names())})")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def family_labels(conditioning: str) -> list[str]:
    """The labels of the registered families conditioned by "prompt" or "class" (for messages)."""
    return [backend_class(n).label for n in backend_names() if backend_class(n).conditioning == conditioning]


def get_backend(preset: "Preset") -> Backend:
    return backend_class(preset.dit.backend)(preset)


def token_patch(preset: "Preset") -> int:
    """Latent pixels per DiT token side of the preset's family (read from `dit.arch`: a patch size, a packing)."""
    return backend_class(preset.dit.backend).config_token_side(dict(preset.dit.arch))


def latent_channels_native(preset: "Preset") -> int:
    """C as the preset's DiT reads it (the family reads it from `dit.arch`; the base VAE's C when not given)."""
    if preset.dit.arch.get("in_channels") is None:
        return preset.vae.base_channels
    return backend_class(preset.dit.backend).config_channels(dict(preset.dit.arch))


def read_max_token_grid(folder: Path) -> Optional[tuple[int, str]]:
    """(the most tokens a side the adapted DiT in `folder` can read, "this <family> transformer's positions reach
    N tokens a side (<config key>)" for messages) from its facts and its transformer's config.json, no weights
    loaded; None when its family has no such limit or the files are not readable (the loader then says why)."""
    try:
        cls = backend_class(str(read_facts(Path(folder))["backend"]))
        side = cls.max_token_grid(json.loads((Path(folder) / "config.json").read_text()))
    except (DavaeError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None
    return None if side is None else (side, cls.grid_limit_phrase(side))


def read_facts(folder: Path) -> dict:
    f = Path(folder) / FACTS_FILE
    if not f.is_file():
        raise DavaeError(f"{folder}: not an adapted DiT (no {FACTS_FILE}; made by `davae adapt-dit`)")
    return json.loads(f.read_text())
