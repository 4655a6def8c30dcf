"""The evaluations behind `davae eval-fid`: FID/KID of folders (or against statistics), statistics files,
and tokenizer metrics (rFID, PSNR, SSIM, LPIPS of a DA-VAE's reconstructions). Every number comes with
what produced it: the feature extractor (name, file, sha256 prefix), the clean-fid mode, how images were
resized to the network's input, and how many images were used."""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import data as D
from ..errors import DavaeError
from .. import latents as L
from ..latents import atomic_write_bytes
from ._util import _first_line
from ..devices import resolve_device
from .extractors import MODES, NO_LOGITS, RESIZE, FeatureExtractor, resolve_extractor
from .features import (FeatureSet, ProgressFn, _loader, _same_shape_runs, _to_chw, cache_root, folder_features,
                       list_folder)
from .fid import frechet, kid
from .stats import _protocol_notes, check_stats_shape, is_stats_file, load_stats_npz, named_stats, parse_stats_name


# LPIPS's trunk for evaluation: AlexNet, the LPIPS authors' forward metric (the `lpips` package's and torchmetrics'
# default); the VAE's training loss keeps its own `loss.lpips_net` (VGG: the perceptual loss of LDM/taming)
EVAL_LPIPS_NET = "alex"
LPIPS_NETS = ("alex", "vgg")
NOISE_LEVEL = 0.25  # --baselines: Gaussian noise on z_d of this many detail stds (is the detail robust to it?)
STRUCTURE_LATENTS = 1024  # detail_structure is measured on the first this many latents (memory bound)


def _protocol(extractor: FeatureExtractor, mode: str) -> dict:
    return {"mode": mode, "feature_extractor": extractor.describe(), "resize": RESIZE[mode]}


def _check_common(mode: str, batch_size: int, num_workers: int, lpips_net: str = EVAL_LPIPS_NET) -> None:
    if lpips_net not in LPIPS_NETS:
        raise DavaeError(f"{lpips_net}: choose from {', '.join(LPIPS_NETS)}", param="lpips_net")
    if mode not in MODES:
        raise DavaeError(f"{mode}: choose from {', '.join(MODES)}", param="mode")
    if batch_size < 1:
        raise DavaeError("must be >= 1", param="batch_size")
    if num_workers < 0:
        raise DavaeError("must be >= 0", param="num_workers")


def evaluate_fid(gen: str | Path, ref: Optional[str | Path] = None, *, ref_stats: Optional[str] = None,
                 mode: str = "clean", with_kid: bool = False, batch_size: int = 32, num_workers: int = 0,
                 device: Optional[str] = None, inception: Optional[str | Path] = None,
                 progress: Optional[ProgressFn] = None, use_cache: bool = True, paired: bool = False,
                 with_sharpness: bool = False, class_probe: Optional[str | Path] = None,
                 probe_per_class: Optional[int] = None, split: Optional[int] = None,
                 lpips_net: str = EVAL_LPIPS_NET) -> dict:
    """FID (and KID) of the images under `gen` against the images under `ref` or against `ref_stats`
    (an .npz with mu/sigma, or clean-fid's NAME[:RES[:SPLIT]]). Returns the result with its protocol.
    `paired`: also `paired_metrics` of GEN against REF images of the same file name. `with_sharpness`: also
    the mean `image.sharpness` of GEN (and REF), in `sharpness`. `class_probe`: a labelled folder (one
    subfolder per class); a linear probe on its Inception features scores whether GEN's images are of the
    class they were generated for (and REF's of their folder's), in `classes` (`classify`). `split`: also the
    FID (and KID) of GEN's images dealt into that many disjoint parts, in `split` (`split_scores`): the FID's
    sampling noise at 1/split of the sample size, from the same features."""
    _check_common(mode, batch_size, num_workers, lpips_net)
    _check_fid_args(ref, ref_stats, split, probe_per_class)
    probe_classes = None
    if class_probe is not None:
        from .classify import class_folders

        probe_classes = class_folders(class_probe)  # a bad folder fails before any model is loaded
    gen_src = list_folder(gen, "GEN")
    if split is not None and len(gen_src.items) < 2 * split:  # before any feature is computed
        raise DavaeError(f"{len(gen_src.items)} GEN images cannot be split into {split} parts of at least 2",
                         param="split")
    ref_src = list_folder(ref, "REF") if ref is not None else None
    ref_file = _stats_file(ref_stats, with_kid)
    notes: list = []
    dev = resolve_device(device)
    extractor = resolve_extractor(mode, dev, inception, notes)
    if ref_stats is not None:
        refs = _reference_stats(ref_stats, ref_file, mode, with_kid, extractor, notes)
    kw = dict(batch_size=batch_size, num_workers=num_workers, progress=progress, use_cache=use_cache, notes=notes)
    g = folder_features(gen, extractor, mode, role="GEN", source=gen_src, **kw)
    mu_g, sigma_g = g.stats()
    result = {"fid": None, "num_gen": g.num, "num_ref": None, "mode": mode,
              "feature_extractor": extractor.describe(), "resize": RESIZE[mode], "reference": None,
              "skipped_gen": len(g.skipped), "skipped_ref": 0, "inception_score": None,
              "inception_score_reason": NO_LOGITS}
    if ref_src is not None:
        r = folder_features(ref, extractor, mode, role="REF", source=ref_src, **kw)
        mu_r, sigma_r = r.stats()
        ref_feats = r.feats
        result.update(num_ref=r.num, reference=str(Path(ref).expanduser()), skipped_ref=len(r.skipped),
                      reference_kind="folder")
        skipped = [(p, w) for p, w in g.skipped] + [(p, w) for p, w in r.skipped]
        cached = {"gen": g.cached, "ref": r.cached}
    else:
        mu_r, sigma_r, ref_feats = refs.mu, refs.sigma, refs.feats
        result.update(num_ref=refs.num, reference=refs.label,
                      reference_kind="npz" if ref_file is not None else "clean-fid")
        skipped = list(g.skipped)
        cached = {"gen": g.cached}
    result["fid"] = frechet(mu_g, sigma_g, mu_r, sigma_r, notes)
    if with_kid:
        result["kid"] = kid(g.feats, ref_feats)
    if split is not None:
        result["split"] = split_scores(g.feats, split, mu_r, sigma_r, ref_feats if with_kid else None, notes)
    result["feature_extractor"] = extractor.describe()
    result["skipped"] = [{"path": p, "reason": w} for p, w in skipped]
    result["cached"] = cached
    result["notes"] = notes
    if paired:
        if ref_src is None:
            raise DavaeError("needs a REF folder (pairs are matched by file name)", param="paired")
        result["paired"] = paired_metrics(gen_src, ref_src, dev, batch_size, progress, lpips_net)
    if with_sharpness:
        from .image import SHARPNESS_NOTE

        result["sharpness"] = {"gen": folder_sharpness(gen_src, "sharpness GEN", progress),
                               "ref": folder_sharpness(ref_src, "sharpness REF", progress) if ref_src is not None else None,
                               "note": SHARPNESS_NOTE}
    if class_probe is not None:
        result["classes"] = _class_scores(class_probe, probe_classes, probe_per_class, extractor, mode, kw,
                                          (gen_src, g), (ref_src, r) if ref_src is not None else None)
    return result


def _check_fid_args(ref, ref_stats, split: Optional[int], probe_per_class: Optional[int]) -> None:
    if split is not None and split < 2:
        raise DavaeError("must be at least 2 (the number of disjoint parts)", param="split")
    if probe_per_class is not None and probe_per_class < 1:
        raise DavaeError("must be at least 1", param="probe_per_class")
    if ref is None and ref_stats is None:
        raise DavaeError("give a reference: a REF folder or --ref-stats NAME_OR_NPZ")
    if ref is not None and ref_stats is not None:
        raise DavaeError("give either a REF folder or --ref-stats, not both")


def _stats_file(ref_stats: Optional[str], with_kid: bool):
    """The reference statistics `ref_stats` names when it is an .npz file (None otherwise: no reference statistics,
    or clean-fid's NAME[:RES[:SPLIT]], whose syntax is checked here, before any model is loaded)."""
    if ref_stats is None:
        return None
    if not is_stats_file(ref_stats):
        parse_stats_name(ref_stats)
        return None
    ref_file = load_stats_npz(ref_stats)
    if with_kid and ref_file.feats is None:
        raise DavaeError(f"needs reference features, and {ref_stats} holds only mu/sigma; pass a REF folder "
                         f"or statistics saved with `--save-stats OUT.npz --kid` (they keep `feats`)", param="kid")
    return ref_file


def _reference_stats(ref_stats: str, ref_file, mode: str, with_kid: bool, extractor, notes: list):
    """The reference statistics of `--ref-stats`: the .npz `ref_file`, or clean-fid's named statistics."""
    refs = ref_file if ref_file is not None else named_stats(ref_stats, mode, with_kid)
    if ref_file is None and not extractor.is_cleanfid:
        notes.append(f"{refs.label} come from clean-fid's Inception; this run uses {extractor.name}")
    check_stats_shape(refs, extractor)
    if ref_file is not None:
        _protocol_notes(refs, extractor, mode, notes)
    return refs


SPLIT_NOTE = ("GEN's readable images in sorted path order, the j-th in part j mod N: for `generate`'s class-balanced "
              "output (file index = class x n + k, k the seed offset) with n a multiple of N and no unreadable file, "
              "every part holds n/N images of every class with seeds of its own; each part is scored against the "
              "whole reference")


def split_scores(feats: np.ndarray, parts: int, mu_r, sigma_r, ref_feats: Optional[np.ndarray],
                 notes: Optional[list] = None) -> dict:
    """FID (and KID when `ref_feats` is given) of `feats`' rows dealt into `parts` disjoint parts (row j in part
    j mod parts) against one reference: independent estimates at 1/parts of the sample size, and their range."""
    if feats.shape[0] < 2 * parts:
        raise DavaeError(f"{feats.shape[0]} usable GEN images cannot be split into {parts} parts of at least 2",
                         param="split")
    fids, kids, nums = [], [], []
    part_notes: list = []
    for i in range(parts):
        part = FeatureSet(feats[i::parts])
        mu, sigma = part.stats()
        fids.append(frechet(mu, sigma, mu_r, sigma_r, part_notes))
        nums.append(part.num)
        if ref_feats is not None:
            kids.append(kid(part.feats, ref_feats))
    if notes is not None:
        notes.extend(n for n in dict.fromkeys(part_notes) if n not in notes)  # once each, not once per part
    out = {"parts": parts, "num_gen": nums, "fid": fids, "fid_range": max(fids) - min(fids), "note": SPLIT_NOTE}
    if ref_feats is not None:
        out["kid"] = kids
    return out


def _class_scores(folder, classes: list, per_class: Optional[int], extractor, mode: str, kw: dict, gen: tuple,
                  ref: Optional[tuple]) -> dict:
    """Fit the linear class probe on a seeded `per_class` images of each class folder and score GEN (labels
    from PNG metadata or folders) and REF (labels from folders) with it."""
    from .classify import (PROBE_NOTE, PROBE_PER_CLASS, cached_probe, folder_label, probe_scores, sample_label,
                           usable_items)

    per_class = PROBE_PER_CLASS if per_class is None else per_class
    src = list_folder(folder, "class-probe")
    by_class: dict = {}
    for it in src.items:
        c = folder_label(it, classes)
        if c >= 0:
            by_class.setdefault(c, []).append(it)
    rng = np.random.default_rng([0, 7])
    picked = []
    for c in sorted(by_class):
        its = by_class[c]
        keep = sorted(rng.choice(len(its), size=min(per_class, len(its)), replace=False).tolist())
        picked += [its[i] for i in keep]
    train_src = D.ImageSource(picked, [])
    fs = folder_features(folder, extractor, mode, role="class-probe", source=train_src, **kw)
    train_items = usable_items(picked, fs.skipped)
    probe = cached_probe(fs.feats, [folder_label(it, classes) for it in train_items], classes,
                         cache_root().parent / "class-probes" if kw.get("use_cache", True) else None,
                         notes=kw.get("notes"))

    def score(pair, labeller):
        s, f = pair
        items = usable_items(s.items, f.skipped)
        if len(items) != f.num:
            raise DavaeError(f"{len(items)} readable images but {f.num} feature rows (a stale feature cache?); "
                             "rerun with --no-cache", param="class_probe")
        return probe_scores(probe, f.feats, [labeller(it, classes) for it in items])

    gen_scores = score(gen, sample_label)
    ref_scores = score(ref, folder_label) if ref is not None else None
    if ref_scores is not None and not ref_scores["labelled"]:
        ref_scores["note"] = "REF's images are not in folders named after the probe's classes"
    return {"gen": gen_scores, "ref": ref_scores, "probe": {**probe.describe(), "data": str(folder),
                                                            "per_class": per_class},
            "note": PROBE_NOTE}


def folder_sharpness(src: D.ImageSource, phase: str = "sharpness", progress: Optional[ProgressFn] = None) -> Optional[float]:
    """The mean `image.sharpness` of a folder's readable images (each at its own size); None if none."""
    from .image import sharpness

    vals = []
    for i, item in enumerate(src.items):
        try:
            arr = D.read_image(item)
        except Exception:
            continue  # unreadable images are already reported by the FID pass
        vals.append(float(sharpness(D.to_tensor(arr)[None])[0]))
        if progress and ((i + 1) % 64 == 0 or i + 1 == len(src.items)):
            progress(phase, i + 1, len(src.items))
    return float(np.mean(vals)) if vals else None


@torch.no_grad()
def paired_metrics(gen_src: D.ImageSource, ref_src: D.ImageSource, device, batch_size: int = 16,
                   progress: Optional[ProgressFn] = None, lpips_net: str = EVAL_LPIPS_NET) -> dict:
    """PSNR, SSIM and LPIPS (`lpips_net`, when its weights are available) of each GEN image against the REF image of
    the same file stem (folders ignored): an upscaled or reconstructed image against its original. Pairs of
    different sizes are skipped and counted; stems without a partner are counted."""
    from .image import reconstruction_metrics

    refs: dict[str, str] = {}
    dup = 0
    for i in range(len(ref_src)):
        dup += ref_src.name(i) in refs
        refs[ref_src.name(i)] = ref_src.items[i]
    lpips_model, lpips_reason = _lpips_or_reason(device, lpips_net)
    pairs = [(gen_src.items[i], refs[gen_src.name(i)]) for i in range(len(gen_src)) if gen_src.name(i) in refs]
    sums = {"psnr": [], "ssim": [], "lpips": []}
    mismatched = 0
    for k in range(0, len(pairs), batch_size):
        groups: dict = {}
        for g_item, r_item in pairs[k : k + batch_size]:
            y, x = D.read_image(g_item), D.read_image(r_item)
            if y.shape != x.shape:
                mismatched += 1
                continue
            groups.setdefault(y.shape, []).append((D.to_tensor(y), D.to_tensor(x)))
        for items in groups.values():
            y = torch.stack([a for a, _ in items]).to(device)
            x = torch.stack([b for _, b in items]).to(device)
            for key, v in reconstruction_metrics(y, x, lpips_model).items():
                sums[key].append(v.float().cpu())
        if progress:
            progress("paired", min(k + batch_size, len(pairs)), len(pairs))
    n = sum(len(v) for v in sums["psnr"])
    if n == 0:
        raise DavaeError("no GEN image has a REF image of the same file name and size to compare with", param="paired")
    out = {"num_pairs": n, "psnr": float(torch.cat(sums["psnr"]).mean()), "ssim": float(torch.cat(sums["ssim"]).mean()),
           "lpips": float(torch.cat(sums["lpips"]).mean()) if sums["lpips"] else None,
           "unmatched_gen": len(gen_src) - len(pairs), "size_mismatch": mismatched,
           "duplicate_ref_names": dup, "match": "same file stem, folders ignored",
           **_lpips_record(lpips_model, lpips_net)}
    if lpips_reason:
        out["lpips_reason"] = lpips_reason
    return out


def _lpips_or_reason(device, net: str = EVAL_LPIPS_NET) -> tuple:
    """(a frozen LPIPS with the `net` trunk on `device`, None) or (None, why it is unavailable)."""
    try:
        from .lpips_weights import build_lpips

        with warnings.catch_warnings():  # torchvision's deprecation notices about `pretrained`
            warnings.simplefilter("ignore")
            return build_lpips(net, off_hint="and run again to get LPIPS (the other metrics do not need it)").to(device), None
    except (DavaeError, ImportError) as e:
        return None, str(e) if isinstance(e, DavaeError) else f"the lpips package is not available ({e})"


def _lpips_record(model, net: str) -> dict:
    """Which LPIPS scored: the trunk and where its weights came from (a local file and its sha256, or
    torchvision's own download), so a number can be traced; nothing when LPIPS was unavailable."""
    if model is None:
        return {"lpips_net": None}
    return {"lpips_net": net, "lpips_backbone": getattr(model, "davae_backbone", None)}


def save_statistics(folder: str | Path, out: str | Path, *, mode: str = "clean", with_feats: bool = False,
                    batch_size: int = 32, num_workers: int = 0, device: Optional[str] = None,
                    inception: Optional[str | Path] = None, progress: Optional[ProgressFn] = None,
                    use_cache: bool = True) -> dict:
    """Write mu, sigma (float64), num_images and the protocol (JSON) of a folder to an .npz; `feats`
    too with `with_feats` (needed to compute KID against the file later)."""
    _check_common(mode, batch_size, num_workers)
    out = Path(out).expanduser()
    if out.suffix.lower() != ".npz":
        raise DavaeError(f"{out}: the file name must end in .npz", param="save_stats")
    src = list_folder(folder, "GEN")
    notes: list = []
    extractor = resolve_extractor(mode, resolve_device(device), inception, notes)
    fs = folder_features(folder, extractor, mode, role="GEN", source=src, batch_size=batch_size,
                         num_workers=num_workers, progress=progress, use_cache=use_cache, notes=notes)
    mu, sigma = fs.stats()
    protocol = {**_protocol(extractor, mode), "num_images": fs.num, "folder": str(Path(folder).expanduser())}
    arrays = dict(mu=mu, sigma=sigma, num_images=np.array(fs.num), protocol=np.array(json.dumps(protocol)))
    if with_feats:
        arrays["feats"] = fs.feats
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())
    return {"saved": str(out), "num_images": fs.num, "feature_dim": int(mu.shape[0]), "with_feats": with_feats,
            "mode": mode, "feature_extractor": extractor.describe(), "resize": RESIZE[mode],
            "skipped_gen": len(fs.skipped), "skipped": [{"path": p, "reason": w} for p, w in fs.skipped],
            "cached": {"gen": fs.cached}, "notes": notes}


@torch.no_grad()
def evaluate_tokenizer(ref: str | Path, vae_dir: str | Path, *, res: Optional[int] = None,
                            base_vae: Optional[str] = None, mode: str = "clean", with_kid: bool = False,
                            batch_size: int = 16, num_workers: int = 0, device: Optional[str] = None,
                            inception: Optional[str | Path] = None, progress: Optional[ProgressFn] = None,
                            baselines: bool = False, lpips_net: str = EVAL_LPIPS_NET) -> dict:
    """Tokenizer metrics: every image under `ref` (short side resized to `res` if given, then centre-
    cropped to a multiple of the DA-VAE's granularity) is encoded and decoded; the 8-bit reconstructions
    are compared with the prepared originals: rFID (and KID), PSNR, SSIM and, when its weights are
    available, LPIPS (`lpips_net`); `detail_structure` of the latents. With `baselines`, the same metrics for the
    base VAE at 1/s + bicubic (the same tokens) and at full resolution (the ceiling), in `baselines`."""
    from ..vae.model import DetailAlignedVAE
    from .image import SHARPNESS_NOTE

    _check_common(mode, batch_size, num_workers, lpips_net)
    if res is not None and res < 1:
        raise DavaeError("must be a positive number of pixels", param="res")
    src = list_folder(ref, "REF")
    notes: list = []
    dev = resolve_device(device)
    vae = DetailAlignedVAE.from_pretrained(vae_dir, base_vae=base_vae).to(dev).eval()
    g = vae.granularity
    if res is not None and res < g:
        raise DavaeError(f"{res} is smaller than one latent token of this DA-VAE ({g} px)", param="res")
    extractor = resolve_extractor(mode, dev, inception, notes)
    lpips_model, lpips_reason = _lpips_or_reason(dev, lpips_net)

    from cleanfid.resize import build_resizer

    resize = build_resizer(mode)
    ds = _PreparedImages(src.items, res, g)
    skipped = [(p, f"unreadable image: {why}") for p, why in src.skipped]
    # per output: the DA-VAE, and with `baselines` (a) the base at 1/s + bicubic, (c) the base at full res,
    # and the DA-VAE on z_base alone (z_d replaced by its linear prediction from z_base)
    names = (("davae", "base_half_bicubic", "base_full", "davae_detail_from_base", "davae_detail_noise") if baselines
             else ("davae",))
    # the predictor's pre-pass keeps its latents (per group of images): the main pass reuses them, not encoding twice
    known: dict = {}
    predictor = _fit_detail_predictor(vae, ds, batch_size, num_workers, dev, progress, known) if baselines else None
    rp = _ReconPass(vae, names, extractor, resize, lpips_model, lpips_reason, predictor, known, dev)
    rp.run(_loader(ds, batch_size, num_workers), src.items, skipped, progress)
    lpips_model, lpips_reason, f_orig = rp.lpips_model, rp.lpips_reason, rp.f_orig
    n = sum(len(a) for a in f_orig)
    if n < 2:
        raise DavaeError(f"REF folder {ref}: {n} usable image(s) ({len(skipped)} unreadable); FID needs at least 2")
    fo = FeatureSet(np.concatenate(f_orig).astype(np.float32))
    extractor._dim = int(fo.feats.shape[1])
    mu_o, sigma_o = fo.stats()
    lpips_on = lpips_model is not None  # False once LPIPS failed
    per = {name: _recon_scores(a, fo, mu_o, sigma_o, notes, with_kid, lpips_on) for name, a in rp.acc.items()}
    from .latent_stats import detail_structure

    result = {**per["davae"], "fid": per["davae"]["rfid"],
              "detail_structure": detail_structure(rp.latents, vae.config.base_channels),
              "sharpness_ref": float(torch.cat(rp.sharp_orig).mean()), "sharpness_note": SHARPNESS_NOTE,
              "num_images": n, "num_gen": n, "num_ref": n, "mode": mode,
              "feature_extractor": extractor.describe(), "resize": RESIZE[mode],
              "reference": str(Path(ref).expanduser()), "reference_kind": "reconstruction",
              "skipped_gen": len(skipped), "skipped_ref": len(skipped),
              "inception_score": None, "inception_score_reason": NO_LOGITS,
              "vae": {**vae.describe(), "path": str(vae_dir)}, "res": res, "granularity": g,
              "image_prep": (f"short side resized to {res} (PIL bicubic), " if res else "")
              + f"centre-cropped to a multiple of {g} px; metrics on 8-bit reconstructions",
              **_lpips_record(lpips_model, lpips_net)}  # None once LPIPS failed
    if baselines and int(vae.detail_stats_images) == 0:
        notes.append("this DA-VAE has no measured detail statistics (std 1 assumed): davae_detail_noise adds noise of "
                     f"{NOISE_LEVEL} absolute, and noise_keep is not reported")
    if lpips_reason is not None:
        result["lpips_reason"] = lpips_reason
    elif os.environ.get("DAVAE_LPIPS_RANDOM_BACKBONE") == "1":
        notes.append("LPIPS uses a random backbone (DAVAE_LPIPS_RANDOM_BACKBONE=1): its value is not comparable")
    if baselines:
        result["baselines"] = _baselines_record(per, vae)
    result["skipped"] = [{"path": p, "reason": w} for p, w in skipped]
    result["notes"] = notes
    return result


class _ReconPass:
    """The reconstruction pass of `evaluate_tokenizer`, one group of same-size images at a time: the latents (the
    first STRUCTURE_LATENTS kept), each output in `names` decoded to 8 bits, and what each accumulates (features,
    PSNR, SSIM, LPIPS, sharpness). LPIPS failing (e.g. its weights) turns it off with its reason."""

    def __init__(self, vae, names, extractor, resize, lpips_model, lpips_reason, predictor, known: dict, dev):
        self.vae, self.names, self.extractor, self.resize, self.dev = vae, names, extractor, resize, dev
        self.lpips_model, self.lpips_reason, self.predictor, self.known = lpips_model, lpips_reason, predictor, known
        self.noise_gen = torch.Generator(device="cpu").manual_seed(0)  # the detail noise of davae_detail_noise
        self.acc = {k: {"feats": [], "psnr": [], "ssim": [], "lpips": [], "sharpness": []} for k in names}
        self.f_orig: list = []
        self.sharp_orig: list = []
        self.latents: list = []  # the first STRUCTURE_LATENTS latents, for detail_structure

    def run(self, loader, items: list, skipped: list, progress: Optional[ProgressFn]) -> None:
        """Every batch of `loader`, one VAE pass per image size; unreadable images appended to `skipped`."""
        done = 0
        for batch in loader:
            groups: dict = {}
            for i, arr, why in batch:
                if arr is None:
                    skipped.append((str(items[i]), why))
                else:
                    groups.setdefault(arr.shape, []).append((i, arr))
            for pairs in groups.values():
                self.group(pairs)
            done += len(batch)
            if progress:
                progress("reconstruct", done, len(items))

    def group(self, pairs: list) -> None:
        from .image import sharpness

        vae, dev, predictor, noise_gen = self.vae, self.dev, self.predictor, self.noise_gen
        arrs = [a for _, a in pairs]
        x = torch.stack([D.to_tensor(a) for a in arrs]).to(dev)
        key = tuple(i for i, _ in pairs)
        if key in self.known:
            latent = self.known.pop(key).to(dev)
        else:
            latent = vae.encode(x).latent
        z_base, _ = L.split(latent, vae.config.base_channels)
        if len(self.latents) < STRUCTURE_LATENTS:
            self.latents.extend(latent[: STRUCTURE_LATENTS - len(self.latents)].float().cpu())
        outs = {"davae": lambda: vae.decode(latent),
                "base_half_bicubic": lambda: vae.decode_baseline(z_base),
                "base_full": lambda: vae.reconstruct_base_full(x),
                "davae_detail_from_base": lambda: vae.decode(predictor.predict(latent)),
                "davae_detail_noise": lambda: vae.decode(_detail_noised(vae, latent, NOISE_LEVEL, noise_gen))}
        for run in _same_shape_runs([_to_chw(self.resize(a)) for a in arrs]):
            self.f_orig.append(self.extractor(torch.stack(run)).cpu().numpy())
        self.sharp_orig.append(sharpness(x).cpu())
        for name in self.names:
            self.record(name, [D.to_uint8(t) for t in outs[name]()], x)  # what a saved PNG would hold

    def record(self, name: str, rec: list, x: torch.Tensor) -> None:
        from .image import reconstruction_metrics, sharpness

        y8 = torch.stack([D.to_tensor(a) for a in rec]).to(self.dev)
        try:
            m = reconstruction_metrics(y8, x, self.lpips_model)
        except Exception as e:  # LPIPS failing (e.g. its weights): report the rest without it
            if self.lpips_model is None:
                raise
            self.lpips_model, self.lpips_reason = None, f"LPIPS failed: {_first_line(e)}"
            m = reconstruction_metrics(y8, x)
        acc = self.acc[name]
        for key in ("psnr", "ssim", "lpips"):
            if key in m:
                acc[key].append(m[key].cpu())
        acc["sharpness"].append(sharpness(y8).cpu())
        for run in _same_shape_runs([_to_chw(self.resize(a)) for a in rec]):
            acc["feats"].append(self.extractor(torch.stack(run)).cpu().numpy())


def _recon_scores(a: dict, fo: FeatureSet, mu_o, sigma_o, notes: list, with_kid: bool, lpips_on: bool) -> dict:
    """One output's scores against the originals' features `fo` (rFID, KID) and its mean paired metrics."""
    fr = FeatureSet(np.concatenate(a["feats"]).astype(np.float32))
    mu_r, sigma_r = fr.stats()
    out = {"rfid": frechet(mu_r, sigma_r, mu_o, sigma_o, notes), "psnr": float(torch.cat(a["psnr"]).mean()),
           "ssim": float(torch.cat(a["ssim"]).mean()),
           "lpips": float(torch.cat(a["lpips"]).mean()) if lpips_on and a["lpips"] else None,
           "sharpness": float(torch.cat(a["sharpness"]).mean())}
    if with_kid:
        out["kid"] = kid(fr.feats, fo.feats)
    return out


def _baselines_record(per: dict, vae) -> dict:
    """`evaluate_tokenizer`'s `baselines`: the base VAE at 1/s + bicubic and at full resolution, the DA-VAE with
    z_d predicted from z_base and with z_d noised, and what they say about the detail channels."""
    a_, b_, c_ = per["base_half_bicubic"]["psnr"], per["davae"]["psnr"], per["base_full"]["psnr"]
    pred_, noisy_ = per["davae_detail_from_base"]["psnr"], per["davae_detail_noise"]["psnr"]
    return {"base_half_bicubic": per["base_half_bicubic"], "base_full": per["base_full"],
                           "davae_detail_from_base": per["davae_detail_from_base"],
                           "davae_detail_noise": per["davae_detail_noise"],
                           "gap_closed": (b_ - a_) / (c_ - a_) if c_ - a_ > 0.1 else None,
                           "detail_gain_db": b_ - pred_,
                           "gain_over_bicubic_db": b_ - a_,
                           "noise_level": NOISE_LEVEL,
                           # the share of the detail's own PSNR gain that survives the noise
                           "noise_keep": ((noisy_ - pred_) / (b_ - pred_) if b_ - pred_ > 1e-3
                                          and int(vae.detail_stats_images) > 0 else None),
                           "note": f"base_half_bicubic: the base VAE on the 1/{vae.config.scale} image + torch "
                                   f"bicubic x{vae.config.scale} in float (the same tokens as the DA-VAE); "
                                   f"base_full: the base VAE at full resolution ({vae.config.scale ** 2}x the tokens); "
                                   f"davae_detail_from_base: the DA-VAE with z_d replaced by its least-squares "
                                   f"prediction from z_base (fitted on the first {STRUCTURE_LATENTS} latents): the "
                                   f"decoder's own upsampling of z_base; detail_gain_db: what z_d's content adds; "
                                   f"davae_detail_noise: z_d + N(0, ({NOISE_LEVEL} x the detail channels' std)²) "
                                   f"(seeded); noise_keep: its share of detail_gain_db"}


def _detail_noised(vae, latent: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    """latent with N(0, (level * detail_std)²) added to its detail channels (detail_std: the DA-VAE's measured
    per-channel std of z_d); noise drawn on the CPU from `gen`, so the numbers do not depend on the device."""
    c = vae.config.base_channels
    noise = torch.randn(latent[:, c:].shape, generator=gen).to(latent.device, latent.dtype)
    std = vae.detail_std.to(latent.device, latent.dtype)[None, :, None, None]
    return torch.cat([latent[:, :c], latent[:, c:] + level * std * noise], 1)


@torch.no_grad()
def _fit_detail_predictor(vae, ds, batch_size: int, num_workers: int, dev, progress, known: dict):
    """`DetailFromBase` fitted on the latents of about the first STRUCTURE_LATENTS readable images (an encode pass,
    in the main pass's batches and same-size groups, stopping at the group that reaches the count); those latents
    are left in `known`, keyed by the image indices of each encoded group, for the main pass to reuse."""
    from .latent_stats import DetailFromBase

    latents: list = []
    for batch in _loader(ds, batch_size, num_workers):
        groups: dict = {}
        for i, arr, _ in batch:  # grouped as the main pass groups them, so its encodings are the same numbers
            if arr is not None:
                groups.setdefault(arr.shape, []).append((i, arr))
        for pairs in groups.values():
            if len(latents) >= STRUCTURE_LATENTS:
                break
            lat = vae.encode(torch.stack([D.to_tensor(a) for _, a in pairs]).to(dev)).latent
            # kept with its memory layout (which changes the decode's rounding), off the accelerator until reused
            known[tuple(i for i, _ in pairs)] = lat.cpu()
            latents.extend(lat[: STRUCTURE_LATENTS - len(latents)].float().cpu())
        if progress:
            progress("fit the detail prediction", len(latents), min(STRUCTURE_LATENTS, len(ds)))
        if len(latents) >= STRUCTURE_LATENTS:
            break
    if not latents:
        raise DavaeError("no readable images to fit the detail prediction on")
    return DetailFromBase.fit(latents, vae.config.base_channels)


class _PreparedImages(torch.utils.data.Dataset):
    """Item i -> (H, W, 3) uint8 fitted to the DA-VAE (D.fit_to_multiple), or the reason it failed."""

    def __init__(self, items: list, res: Optional[int], multiple: int):
        self.items, self.res, self.multiple = items, res, multiple

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            arr = D.read_image(self.items[i])
        except Exception as e:
            return i, None, f"unreadable image: {_first_line(e)}"
        try:
            return i, np.array(D.fit_to_multiple(arr, self.res, self.multiple)), None  # a writable copy
        except DavaeError as e:
            return i, None, str(e)
