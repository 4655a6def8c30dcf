"""SD3 backend: load a diffusers `SD3Transformer2DModel`, extend it to C + D channels, add LoRA with peft,
and export it as a plain diffusers folder (LoRA merged) that needs no custom code to load."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import DavaeError, first_line
from .extend import extend_output_head, extend_patch_embed


def load_sd3_transformer(spec: str, subfolder: Optional[str] = "transformer", arch: Optional[dict] = None,
                         seed: int = 0, dtype: torch.dtype = torch.float32, device=None):
    """`spec`: "random" (a new model from `arch`, seeded), a local folder (a transformer folder, or a pipeline
    folder with `subfolder`), or a hub id. `device`: where a random model is initialised (a GPU is much
    faster for billions of parameters; the values then differ from a CPU initialisation)."""
    from diffusers import SD3Transformer2DModel

    from .loader import load_transformer

    return load_transformer(SD3Transformer2DModel, spec, subfolder, arch, seed=seed, dtype=dtype, device=device,
                            hub_hint=", or for the gated stabilityai models accept the licence on the hub and run "
                                     "`huggingface-cli login`")


def extend_sd3(model, detail_channels: int):
    """The zero-init channel extension of SPEC §6 in place: `pos_embed.proj` reads C + D channels and
    `proj_out` writes p*p*(C+D) values in the (p, q, c) unpatchify layout. The config is updated, so
    `save_pretrained` writes a standard folder with in_channels = out_channels = C + D."""
    cfg = model.config
    c, p = cfg.in_channels, cfg.patch_size
    if (cfg.out_channels or c) != c:
        raise DavaeError(f"SD3 transformer: in_channels {c} != out_channels {cfg.out_channels}; cannot extend")
    if detail_channels <= 0:
        raise DavaeError(f"detail channels must be positive, got {detail_channels}")
    model.pos_embed.proj = extend_patch_embed(model.pos_embed.proj, detail_channels)
    model.proj_out = extend_output_head(model.proj_out, p, c, detail_channels)
    model.out_channels = c + detail_channels
    model.register_to_config(in_channels=c + detail_channels, out_channels=c + detail_channels)
    return model


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


def pipeline_sigmas(steps: int, shift: Optional[float] = None, scheduler_config: Optional[dict] = None,
                    image_tokens: Optional[int] = None) -> torch.Tensor:
    """The `steps + 1` sigmas (float32, ending in 0) that `StableDiffusion3Pipeline.__call__` steps through
    with this scheduler configuration: diffusers' own `FlowMatchEulerDiscreteScheduler.set_timesteps`,
    called as the pipeline calls it (`retrieve_timesteps`, and `mu` from the pipeline's `calculate_shift`
    when the config uses dynamic shifting). `shift` replaces the config's shift; `scheduler_config` None:
    diffusers' defaults."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    cfg = dict(scheduler_config or {})
    if cfg.get("stochastic_sampling"):
        raise DavaeError("the pipeline's scheduler uses stochastic sampling, which davae's ODE sampler does not "
                         "reproduce; pass a scheduler_config without it")
    if shift is not None:
        cfg["shift"] = float(shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    kwargs = {}
    if sched.config.get("use_dynamic_shifting"):
        if image_tokens is None:
            raise DavaeError("the scheduler uses dynamic shifting: the image token count is needed")
        c = sched.config
        kwargs["mu"] = calculate_shift(image_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                       c.get("base_shift", 0.5), c.get("max_shift", 1.16))
    retrieve_timesteps(sched, steps, "cpu", **kwargs)
    return sched.sigmas.detach().float().cpu()
