"""The detail frontier (issue 37, item 5): every tokenizer design tried, its share of the PSNR gap closed (x)
against how much of its detail is its own and shaped like real detail (y: the share of z_d's variance beyond its
linear prediction from z_base), with the reference detail (the base VAE's own full-resolution latent, unshuffled)
as the target. Points come from benchmarks/results/frontier.json (each with its source in BENCHMARKS.md) and,
optionally, from a detail.sh run's results.json (its tokenizer stage).

  python benchmarks/frontier.py [--chain OUT/results.json] [--out docs/frontier.png]

Needs matplotlib (`pip install "davae[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
POINTS = HERE / "results" / "frontier.json"


def chain_point(results: dict, name: str = "imagenette-detail") -> dict | None:
    """The tokenizer stage of a detail.sh run as a frontier point (None before that stage has run), with the
    same-base FIDs (generated detail | detail from base | base + bicubic) when that stage has run."""
    tok = results.get("tokenizer") or {}
    if tok.get("gap_closed") is None or tok.get("residual_share") is None:
        return None
    return {"name": name, "data": f"Imagenette val, {tok.get('num_images')} images at 224²",
            "gap_closed": tok["gap_closed"], "residual_share": tok["residual_share"],
            "neighbour_corr": tok["neighbour_corr"], "kurtosis": tok["kurtosis"],
            "detail_gain_db": tok.get("detail_gain_db"), "source": "detail.sh results.json, tokenizer stage",
            "same_base_fid": (results.get("same_base") or {}).get("fid"), "reference": tok.get("reference")}


def load_points(chain: Path | None) -> tuple[list[dict], dict]:
    data = json.loads(POINTS.read_text())
    points, reference = list(data["points"]), dict(data["reference"])
    if chain is not None:
        try:
            p = chain_point(json.loads(chain.read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --chain {chain}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if p is not None:
            points = [q for q in points if q["name"] != p["name"]] + [p]
            ref = p.pop("reference") or {}
            if ref.get("residual_share") is not None:  # the same run's own reference (its ceilings stage)
                reference.update({k: v for k, v in ref.items() if v is not None}, source="detail.sh ceilings stage")
    return points, reference


def plot(points: list[dict], reference: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    share = reference["residual_share"]
    ax.axvspan(0.4, 1.05, ymin=0, ymax=1, color="#e8f4e8", zorder=0)
    ax.axhline(0.5 * share, color="#4a8a4a", lw=1, ls="--", zorder=1)
    ax.text(1.03, 0.5 * share, "gate: half the reference's share ", va="bottom", ha="right", fontsize=7,
            color="#4a8a4a")
    ax.text(0.41, 0.98, "gate: >= 40 % of the gap", fontsize=7, color="#4a8a4a", va="top",
            transform=ax.get_xaxis_transform())  # x in data, y in axes units
    ax.scatter([1.0], [share], marker="*", s=220, color="#d08000", zorder=3)
    ax.annotate(f"reference: the base VAE's own 224² latent\n(neighbour corr {reference['neighbour_corr']:.2f}, "
                f"kurtosis {reference['kurtosis']:.2f})", (1.0, share), xytext=(-10, 12),
                textcoords="offset points", ha="right", fontsize=7)
    for p in points:
        met = (p["gap_closed"] >= 0.4 and p["residual_share"] >= 0.5 * share
               and p.get("neighbour_corr") is not None and abs(p["neighbour_corr"] - reference["neighbour_corr"]) <= 0.1
               and p.get("kurtosis") is not None and p["kurtosis"] < 4)
        ax.scatter([p["gap_closed"]], [p["residual_share"]], s=60, zorder=3,
                   color="#2a7a2a" if met else "#3060a0", marker="o" if p["data"].startswith("Imagenette") else "s")
        nc = "n/a" if p.get("neighbour_corr") is None else f"{p['neighbour_corr']:.2f}"
        ku = "n/a" if p.get("kurtosis") is None else f"{p['kurtosis']:.1f}"
        sb = p.get("same_base_fid") or {}
        gen = "" if sb.get("generated_detail") is None else (
            f"\nsame bases, FID: generated detail {sb['generated_detail']:.0f} | from base "
            f"{sb['detail_from_base']:.0f} | bicubic {sb['base_bicubic']:.0f}")
        ax.annotate(f"{p['name']}\n(nc {nc}, kurt {ku}){gen}", (p["gap_closed"], p["residual_share"]),
                    xytext=tuple(p.get("label_offset", (6, 4))), textcoords="offset points", fontsize=7)
    ax.set_xlim(-0.03, 1.05)
    ax.set_ylim(-0.03, max(0.9, max(p["residual_share"] for p in points) + 0.08))
    ax.set_xlabel("share of the PSNR gap closed (base at 1/2 + bicubic -> base at full resolution)")
    ax.set_ylabel("share of z_d's variance beyond its linear prediction from z_base")
    ax.set_title("Detail channels: reconstruction against generable structure\n"
                 "(circles: Imagenette val 224²; squares: sun_hays80 256²; nc = neighbour correlation of that part)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", type=Path, help="a detail.sh OUT/results.json: its tokenizer becomes a point")
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "frontier.png")
    a = ap.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit('error: the frontier plot needs matplotlib: pip install "davae[plot]"') from None
    points, reference = load_points(a.chain)
    print(plot(points, reference, a.out))


if __name__ == "__main__":
    main()
