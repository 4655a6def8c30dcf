"""What the text-to-image families built on a diffusers transformer share (`DiffusersBackend`): loading
from `random`, a folder or a hub id; LoRA with peft on the preset's targets next to fully trained modules;
export as a plain diffusers folder (LoRA merged) plus the adapter; the pipeline's scheduler config; the
native model of a pipeline folder (its transformer and VAE) for `generate --native`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import DavaeError, first_line
from .backend import Backend, place_frozen


class DiffusersBackend(Backend):
    """A prompt-conditioned family on a diffusers transformer. Subclasses set `transformer_class` (the
    diffusers class name), `default_scheduler` (None: diffusers' FlowMatchEulerDiscreteScheduler defaults),
    `hub_hint`, and implement the family's forward, extension and text encoders."""

    transformer_class: str = ""
    default_scheduler: Optional[dict] = None
    default_scheduler_name: str = "diffusers' FlowMatchEulerDiscreteScheduler defaults"
    hub_hint: str = ""

    @classmethod
    def model_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.transformer_class)

    def load(self, spec: str, seed: int = 0, dtype=torch.float32, device=None, latent_side=None) -> nn.Module:
        from .loader import load_transformer

        return load_transformer(self.model_class(), spec, self.preset.dit.subfolder, self.preset.dit.arch, seed=seed,
                                dtype=dtype, device=device, hub_hint=self.hub_hint)

    def text_tokens(self) -> int:
        return int(self.preset.dit.max_sequence_length)

    @classmethod
    def scheduler_config(cls, spec: Optional[str]) -> tuple[Optional[dict], str]:
        cfg = scheduler_config_of(spec)
        if cfg is not None:
            return cfg, "the DiT's pipeline"
        return dict(cls.default_scheduler or {}), cls.default_scheduler_name

    def sampling_facts(self, model, dit_spec: str) -> dict:
        cfg, source = self.scheduler_config(dit_spec)
        return {"scheduler_config": cfg, "scheduler_source": source, "guidance_mode": self.guidance_mode(dict(model.config))}

    def prepare_training(self, model) -> list[str]:
        """LoRA on the preset's targets (if any) + the fully trained modules; returns trainable names."""
        d = self.preset.dit
        if d.lora_rank:
            add_lora(model, d.lora_rank, d.lora_alpha, d.lora_targets, d.lora_init)
            return set_trainable(model, d.full_train)
        return super().prepare_training(model)

    def export(self, model, folder: Path) -> None:
        """A plain diffusers folder (LoRA merged) + the adapter in `lora/`."""
        plain = merged_copy(model) if hasattr(model, "peft_config") else model
        plain.save_pretrained(str(folder), safe_serialization=True)
        if hasattr(model, "peft_config"):
            save_lora(model, folder / "lora")

    def native_model(self, spec, *, res, vae_dir, shift, recipe, device, dtype, on_message=lambda t: None):
        """The unmodified transformer and VAE of a pipeline folder / hub id, sampled on the pipeline's own
        scheduler config (`shift` None: its shift, as its `__call__`)."""
        from ..sampling import SamplingModel
        from ..vae.base import base_decode, base_downsample_factor, load_base_vae
        from .loader import check_fits_cpu, params_of_config

        if spec is None or spec == "random":
            raise DavaeError(f"needs --base-pipeline (a {self.label} pipeline folder or hub id)", param="native")
        if res is None:
            raise DavaeError("needs --res", param="native")
        for cand in (Path(spec) / "transformer" / "config.json", Path(spec) / "config.json"):
            if cand.is_file():
                check_fits_cpu(params_of_config(cand, self.model_class()), torch.device(device),
                               f"the transformer of {spec}")
                break
        from .loader import load_transformer

        dit = place_frozen(load_transformer(self.model_class(), spec, "transformer", None, hub_hint=self.hub_hint),
                           device, dtype)
        base = load_base_vae(spec, "vae")
        vae = base.vae.to(device)
        cfg = scheduler_config_of(spec)
        if cfg is None:
            on_message(f"warning: {spec} has no scheduler/scheduler_config.json: sampling with "
                       f"{self.default_scheduler_name}")
        cfg = cfg or dict(self.default_scheduler or {})
        scale = float(getattr(vae.config, "scaling_factor", None) or 1.0)
        offset = float(getattr(vae.config, "shift_factor", None) or 0.0)

        def decode(latent):
            return base_decode(vae, latent.to(next(vae.parameters()).dtype) / scale + offset)

        return SamplingModel(
            name="native", backend=type(self), dit=dit, base_channels=self.channels(dit), detail_channels=0,
            granularity=base_downsample_factor(vae), patch_size=self.patch_size(dit),
            shift=float(shift if shift is not None else cfg.get("shift", 1.0)), decoder=decode, recipe=recipe,
            conditioning="prompt", scheduler_config=cfg, guidance_mode=self.guidance_mode(dict(dit.config)),
            identity={"base_pipeline": spec, "base_vae_hash": base.content_hash}, parts={"vae": vae})


def add_lora(model, rank: int, alpha: float, targets: list[str], init: str = "gaussian") -> list[str]:
    """Add a peft LoRA adapter ("default") on the modules whose names end with one of `targets`.
    Returns the adapted module names. LoRA weights stay fp32 (SPEC §10.7)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                        init_lora_weights=True if init == "default" else init)
    try:
        model.add_adapter(config)
    except ValueError as e:
        raise DavaeError(f"dit.lora_targets: {first_line(e, 200)}") from None
    return lora_module_names(model)


def lora_module_names(model: nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted(n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))


def set_trainable(model: nn.Module, full_train: list[str]) -> list[str]:
    """Freeze everything except the LoRA weights and the modules named in `full_train` (exact names)."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    missing = [n for n in full_train if n not in modules]
    if missing:
        raise DavaeError(f"dit.full_train: no module named {missing[0]!r} in the DiT")
    for name in full_train:
        modules[name].requires_grad_(True)
    for n, prm in model.named_parameters():
        if "lora_" in n:
            prm.requires_grad_(True)
    return [n for n, prm in model.named_parameters() if prm.requires_grad]


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every LoRA layer merged into its base layer and removed: a plain model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, module.get_base_layer())
    if hasattr(out, "_hf_peft_config_loaded"):
        out._hf_peft_config_loaded = False
    if hasattr(out, "peft_config"):
        del out.peft_config
    return out


def save_lora(model: nn.Module, folder: Path) -> None:
    """The peft adapter on its own (diffusers' `save_lora_adapter`: `pytorch_lora_weights.safetensors`)."""
    model.save_lora_adapter(str(folder), adapter_name="default")
    cfg = model.peft_config["default"].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    (Path(folder) / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str))


# ------------------------------------------------------------------------------------------- sampling grid
def scheduler_config_of(spec: Optional[str]) -> Optional[dict]:
    """The `scheduler/scheduler_config.json` of an SD3 pipeline (local folder or hub id) without its
    `_`-prefixed bookkeeping keys, or None when `spec` has none (a bare transformer folder, `random`, or a
    hub id that cannot be reached)."""
    if not spec or spec == "random":
        return None
    cfg = None
    path = Path(spec).expanduser()
    if path.exists():
        for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                     path.parent / "scheduler" / "scheduler_config.json"):
            if cand.is_file():
                cfg = json.loads(cand.read_text())
                break
    else:
        try:
            from diffusers import FlowMatchEulerDiscreteScheduler

            cfg = dict(FlowMatchEulerDiscreteScheduler.load_config(spec, subfolder="scheduler"))
        except Exception:  # noqa: BLE001 - offline or gated: no pipeline scheduler to follow
            return None
    return None if cfg is None else {k: v for k, v in cfg.items() if not k.startswith("_")}
