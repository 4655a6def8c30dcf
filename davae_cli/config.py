"""Presets: YAML files loaded into typed dataclasses, the single source of truth for every recipe number.

A preset is a YAML mapping with one section per dataclass of `config_schema.py`. `load_preset("tiny")` reads
the bundled `presets/tiny.yaml`; a path to a YAML file works too. `overrides=["loss.align=0"]` applies
`--set key=value` edits. Unknown keys, wrong types and impossible shapes raise `ConfigError` with a
one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from .config_schema import Preset, _to_plain  # Preset: also `from davae_cli.config import Preset`, as before
from .errors import first_line

PRESET_PACKAGE = "davae_cli.presets"  # the repository's top-level presets/, installed as package data


def _bundled():
    """The bundled presets folder (an importlib.resources Traversable: a folder, or inside a wheel/zip)."""
    import importlib.resources

    return importlib.resources.files(PRESET_PACKAGE)


class ConfigError(ValueError):
    """A preset or override is invalid; the message is one line and names the key."""


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in _bundled().iterdir() if p.name.endswith(".yaml"))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - programming error


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'preset'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(str(k), sorted(names), n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown key '{prefix}{k}' ({hint}known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key)
    return cls(**kwargs)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`'loss.align=0.5'` -> `('loss.align', 0.5)`; the value is parsed as YAML (so `null`, `[0.9, 0.99]` work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key, value


def read_preset_yaml(name_or_path: str | Path, _depth: int = 0) -> dict:
    """The raw mapping of a bundled preset name or a YAML file path."""
    p = Path(name_or_path)
    stem = p.stem
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"preset file not found: {p}")
        path = p
    else:
        path = _bundled() / f"{name_or_path}.yaml"
        stem = str(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"unknown preset '{name_or_path}' (bundled: {', '.join(available_presets())}; or pass a YAML path)"
            )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({first_line(e, 200)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping")
    data.setdefault("name", stem)
    return _resolve_extends(data, path, _depth)


# mappings that describe one architecture: a child preset's replaces its parent's whole, never key by key
_REPLACED_WHOLE = {("dit", "arch"), ("vae", "base_vae_arch")}


def _deep_merge(parent: dict, child: dict, where: tuple = ()) -> dict:
    out = dict(parent)
    for k, v in child.items():
        merge = isinstance(v, dict) and isinstance(out.get(k), dict) and (*where, k) not in _REPLACED_WHOLE
        out[k] = _deep_merge(out[k], v, (*where, k)) if merge else v
    return out


def _resolve_extends(data: dict, path, depth: int) -> dict:
    """`extends: NAME` (a bundled preset or a YAML path, relative to this file): the parent's mapping with this
    one merged over it, section by section (mappings merge, lists and values replace; `dit.arch` and
    `vae.base_vae_arch` replace whole). The -official presets are written this way, so each lists exactly
    what differs from ours."""
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data
    if depth >= 8:
        raise ConfigError(f"{path}: `extends` nests more than 8 presets deep (a cycle?)")
    if not isinstance(parent_name, str):
        raise ConfigError(f"{path}: `extends` must name a preset, got {parent_name!r}")
    candidate = Path(str(path)).parent / parent_name
    ref = candidate if parent_name.endswith((".yaml", ".yml")) and candidate.is_file() else parent_name
    parent = read_preset_yaml(ref, depth + 1)
    parent.pop("description", None)
    return _deep_merge(parent, data)


def preset_from_dict(data: dict, overrides: list[str] | None = None) -> Preset:
    data = _to_plain(dict(data))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    if isinstance(data.get("dit"), dict) and "timestep_shift" in data["dit"]:
        raise ConfigError("dit.timestep_shift was split in two: dit.train_shift (training) and sample.shift "
                          "(sampling); see CHANGELOG.md")
    preset = _build(Preset, data, "")
    validate(preset)
    return preset


def load_preset(name_or_path: str | Path, overrides: list[str] | None = None) -> Preset:
    """Load a bundled preset by name or a YAML file by path, apply `key=value` overrides, validate."""
    return preset_from_dict(read_preset_yaml(name_or_path), overrides)


# ------------------------------------------------------------------------------------------- validation
# A preset is checked against two tables, each rule written once: bounds on single values (dotted key, test,
# what the value must be), and rules across fields (a test on the preset that holds when it is wrong, and the
# message). `{s}`/`{g}`/`{ss}` in messages are s, s*f and s²; `{v}` is the value.
def _positive(v) -> bool:
    return v > 0


def _nonnegative(v) -> bool:
    return v >= 0


def _fraction(v) -> bool:
    return 0 <= v < 1


_POS, _NONNEG, _FRAC = (_positive, "must be positive"), (_nonnegative, "must be >= 0"), (_fraction, "must be in [0, 1)")
_TRAINERS = ("adapt_dit", "train_dit")  # the FlowTrainingConfig sections: their shared fields share their bounds

BOUNDS: list[tuple[str, tuple]] = [
    *[(k, _POS) for k in ("vae.base_channels", "vae.detail_channels", "vae.downsample", "vae.scale",
                          "train_vae.resolution", "train_vae.batch_size", "train_vae.checkpoint_every",
                          "train_vae.keep_checkpoints", "train_vae.log_every", "train_vae.eval_every",
                          "dit.train_shift", "adapt_dit.detail_ramp_steps")],
    *[(f"{sec}.{k}", _POS) for sec in _TRAINERS
      for k in ("batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "encode_batch_size",
                "loss_weight_gamma")],
    *[(f"{sec}.{k}", _NONNEG) for sec in _TRAINERS for k in ("steps", "cosine_loss", "max_images")],
    *[(f"{sec}.ema_decay", _FRAC) for sec in _TRAINERS],
    *[(k, _NONNEG) for k in ("train_vae.steps", "train_vae.max_images", "train_vae.max_val", "train_dit.max_minutes",
                             "adapt_dit.detail_stats_latents", "adapt_dit.detail_noise", "vae.down_blocks",
                             "vae.up_blocks", "dit.lora_rank",
                             "loss.l1", "loss.lpips", "loss.kl", "loss.adv", "loss.align")],
    *[(k, _FRAC) for k in ("loss.detail_dropout", "train_vae.ema_decay", "dit.cond_dropout")],
    ("data.latent_shard_size", (_positive, "must be >= 1")),
]

RULES: list[tuple[Callable[["Preset"], bool], str]] = [
    (lambda p: p.vae.scale < 2,
     "vae.scale: s must be at least 2 (the paper: 2; s = 4 puts the base at a quarter of the resolution), got {s}"),
    (lambda p: p.vae.down_blocks == 0 and (2 * p.vae.detail_channels) % (p.vae.scale ** 2),
     "vae.detail_channels: 2D = {2D} must be divisible by s² = {ss} (the detail encoder's pixel-unshuffle({s}))"),
    (lambda p: p.vae.detail_channels % p.vae.base_channels,
     "vae.detail_channels: D = {D} is not a multiple of C = {C}"),
    (lambda p: p.train_vae.resolution % p.granularity,
     "train_vae.resolution: {p.train_vae.resolution} is not divisible by s*f = {g}"),
    (lambda p: p.train_vae.crop_size is not None and (p.train_vae.crop_size <= 0 or p.train_vae.crop_size % p.granularity),
     "train_vae.crop_size: {p.train_vae.crop_size} is not a positive multiple of s*f = {g}"),
    (lambda p: not 0 <= p.train_vae.lr_end <= p.train_vae.lr,
     "train_vae.lr_end must be in [0, train_vae.lr = {p.train_vae.lr}], got {p.train_vae.lr_end}"),
    (lambda p: p.vae.decoder_input == "residual" and p.vae.up_shortcut != "none",
     "vae.up_shortcut must be 'none' with vae.decoder_input = residual"),
    (lambda p: p.vae.down_blocks > 0 and p.vae.detail_features != "residual",
     "vae.down_blocks > 0 needs vae.detail_features = residual"),
    (lambda p: p.vae.down_blocks > 0 and p.vae.down_hidden <= 0,
     "vae.down_blocks > 0 needs vae.down_hidden > 0 (the encoder's width)"),
    (lambda p: p.vae.down_blocks > 0 and p.vae.detail_shortcut != "base",
     "vae.detail_shortcut must be 'base' with vae.down_blocks > 0"),
    (lambda p: p.vae.residual_band != "full" and p.vae.decoder_input != "residual",
     "vae.residual_band = high needs vae.decoder_input = residual"),
    (lambda p: p.vae.up_blocks > 0 and p.vae.decoder_input != "residual",
     "vae.up_blocks > 0 needs vae.decoder_input = residual"),
    (lambda p: p.vae.up_blocks > 0 and (p.vae.up_hidden <= 0 or p.vae.up_hidden % p.vae.scale ** 2),
     "vae.up_blocks > 0 needs vae.up_hidden > 0 and divisible by s² = {ss}, got {p.vae.up_hidden}"),
    (lambda p: p.train_vae.cache_base and (p.vae.detail_features != "residual" or p.vae.decoder_input != "residual"),
     "train_vae.cache_base needs vae.detail_features = residual and vae.decoder_input = residual (a frozen base path)"),
    (lambda p: not p.train_vae.train_encoder and not p.train_vae.init_from,
     "train_vae.train_encoder = false (--decoder-only) needs train_vae.init_from (--init): the DA-VAE whose "
     "encoder to keep"),
    (lambda p: p.dit.backend not in _backend_names(),
     "dit.backend: {p.dit.backend!r} is not a DiT family ({families})"),
    (lambda p: p.adapt_dit.resolution <= 0 or p.adapt_dit.resolution % p.granularity,
     "adapt_dit.resolution: {p.adapt_dit.resolution} is not a positive multiple of s*f = {g}"),
    (lambda p: p.train_dit.resolution <= 0 or p.train_dit.resolution % p.vae.downsample,
     "train_dit.resolution: {p.train_dit.resolution} is not a positive multiple of f = {p.vae.downsample}"),
    (lambda p: p.dit.lora_rank and not p.dit.lora_targets,
     "dit.lora_targets: LoRA (dit.lora_rank > 0) needs the module names to adapt"),
]


def _backend_names() -> tuple[str, ...]:
    from .dit.registry import backend_names

    return backend_names()


def _get(p: "Preset", key: str):
    node = p
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(p: Preset) -> None:
    """Shape checks that would otherwise fail deep inside a run: the BOUNDS and RULES tables, then the
    sampling recipe (shared with the commands' flags)."""
    for key, (holds, must) in BOUNDS:
        value = _get(p, key)
        if not holds(value):
            raise ConfigError(f"{key} {must}, got {value}")
    v = p.vae
    fields = {"p": p, "s": v.scale, "ss": v.scale ** 2, "g": p.granularity, "C": v.base_channels,
              "D": v.detail_channels, "2D": 2 * v.detail_channels, "families": ", ".join(_backend_names())}
    for wrong, message in RULES:
        if wrong(p):
            raise ConfigError(message.replace("{2D}", str(fields["2D"])).format(**fields))
    check_sampling(p.sample.steps, p.sample.shift, p.sample.guidance_interval, p.sample.sampler, section="sample")


def check_sampling(steps: Optional[int], shift: Optional[float], interval: Optional[tuple[float, float]],
                   sampler: Optional[str] = None, section: Optional[str] = None) -> None:
    """The sampling settings' bounds, shared by a preset's `sample` section (`section="sample"`: a
    ConfigError naming `sample.<key>`) and the sampling parameters of generate/bench (`section=None`: a
    DavaeError with `param=`, which the command line writes as the flag; the step count is `sampling_steps`
    there). None: not given, not checked."""
    from .errors import DavaeError

    def fail(key: str, message: str) -> None:
        if section:
            raise ConfigError(f"{section}.{key} {message}")
        raise DavaeError(message, param="sampling_steps" if key == "steps" else key)

    if steps is not None and steps < 1:
        fail("steps", f"must be at least 1, got {steps}")
    if shift is not None and not shift > 0:
        fail("shift", f"must be positive, got {shift}")
    if interval is not None:
        lo, hi = interval
        if not (0.0 <= lo <= hi <= 1.0):
            fail("guidance_interval", f"{lo},{hi}: needs 0 <= LO <= HI <= 1 (sigma; 1 is noise)")
    if sampler is not None and sampler not in ("euler", "heun"):
        fail("sampler", f"{sampler}: choose euler or heun")
