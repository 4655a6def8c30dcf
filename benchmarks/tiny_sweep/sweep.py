"""Design sweep for the `tiny` DA-VAE preset (an experiment script, not part of the package).

Trains one detail encoder/decoder design on cached TAESD3 outputs and prints held-out PSNR/SSIM of
(b) and the share of the (a) -> (c) PSNR gap it closes, as JSON lines and `--out/NAME.json`.
Designs: `pix` (what became vae.down_blocks / vae.up_blocks: residual networks on x - baseline, the
decoder also reads the baseline), `pixz` (the encoder also reads the full-resolution TAESD3 latent),
`lat` (predict the full-resolution TAESD3 latent and decode it with the frozen TAESD3 decoder;
`--pixw` adds a pixel L1 through that decoder). No EMA; training crops are `--crops` random 256²
crops per image, fixed once (the package's trainer draws crops from whole images).

Stage the inputs beside this file (nothing is downloaded):
    cp -r ../shared/weights/taesd3 ../shared/data/sun_hays80 benchmarks/tiny_sweep/
    python -c "import torch; from davae_cli.data import center_crops, list_images; \
        v = center_crops(list_images(['skimage']), 256)[0]; \
        torch.save(((v + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), 'benchmarks/tiny_sweep/val.pt')"
then `bash benchmarks/tiny_sweep/run_sweep.sh` (eight runs in parallel on one GPU; BENCHMARKS.md).
"""
import sys, time, math, os, json, argparse, torch, numpy as np, torch.nn as nn, torch.nn.functional as F
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from davae_cli.data import list_images, read_image, to_tensor, random_crop
from davae_cli.vae.base import load_base_vae, base_encode_mean, base_decode
from davae_cli import latents as L
from davae_cli.metrics import psnr, ssim
ap = argparse.ArgumentParser()
ap.add_argument("--name", default="run"); ap.add_argument("--design", default="pix")
ap.add_argument("--steps", type=int, default=15000); ap.add_argument("--width", type=int, default=128)
ap.add_argument("--eb", type=int, default=2); ap.add_argument("--db", type=int, default=2); ap.add_argument("--align", type=float, default=0.5)
ap.add_argument("--crop", type=int, default=128); ap.add_argument("--bs", type=int, default=8); ap.add_argument("--lr", type=float, default=5e-4)
ap.add_argument("--sigma", type=float, default=0.0025); ap.add_argument("--every", type=int, default=2500)
ap.add_argument("--pixw", type=float, default=0.0); ap.add_argument("--crops", type=int, default=8); ap.add_argument("--out", default=".")
ap.add_argument("--threads", type=int, default=2); ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args(); print(args, flush=True)
torch.manual_seed(args.seed); torch.set_num_threads(args.threads)
dev = "cuda" if torch.cuda.is_available() else "cpu"
base = load_base_vae(os.path.join(HERE, "taesd3"), None, 16)
vae = base.vae.eval().requires_grad_(False).to(dev)
cp = os.path.join(HERE, f"cache{args.crops}.pt")
if os.path.exists(cp):
    X, B, Z, ZF = torch.load(cp)
else:
    rng = np.random.default_rng(0); xs = []
    for item in list_images([os.path.join(HERE, "sun_hays80")]).items:
        arr = read_image(item)
        for _ in range(args.crops): xs.append(to_tensor(random_crop(arr, 256, rng)))
    X = torch.stack(xs); Bs, Zs, ZFs = [], [], []
    with torch.no_grad():
        for i in range(0, len(X), 16):
            x = X[i:i+16].to(dev)
            z = base_encode_mean(vae, L.downsample(x, 2)); Zs.append(z.cpu())
            Bs.append(L.upsample(base_decode(vae, z).clamp(-1, 1), 2).cpu()); ZFs.append(base_encode_mean(vae, x).cpu())
    B, Z, ZF = torch.cat(Bs), torch.cat(Zs), torch.cat(ZFs); torch.save((X, B, Z, ZF), cp + f".{os.getpid()}"); os.replace(cp + f".{os.getpid()}", cp)
X, B, Z, ZF = X.to(dev), B.to(dev), Z.to(dev), ZF.to(dev)
val = torch.load(os.path.join(HERE, "val.pt")).float().div(127.5).sub(1).to(dev)
with torch.no_grad():
    vz = base_encode_mean(vae, L.downsample(val, 2)); va = L.upsample(base_decode(vae, vz).clamp(-1, 1), 2)
    vzf = base_encode_mean(vae, val); c = base_decode(vae, vzf).clamp(-1, 1)
pa, pc = psnr(va, val).mean().item(), psnr(c, val).mean().item()
print(f"val n={val.shape[0]} a={pa:.2f} c={pc:.2f}", flush=True)
class Res(nn.Module):
    def __init__(s, w):
        super().__init__(); s.c1 = nn.Conv2d(w, w, 3, padding=1); s.c2 = nn.Conv2d(w, w, 3, padding=1)
    def forward(s, x): return x + s.c2(F.silu(s.c1(F.silu(x))))
W = args.width
def trunk(cin, cout, nb, zero=False):
    m = nn.Sequential(nn.Conv2d(cin, W, 3, padding=1), *[Res(W) for _ in range(nb)], nn.SiLU(), nn.Conv2d(W, cout, 3, padding=1))
    if zero: nn.init.zeros_(m[-1].weight); nn.init.zeros_(m[-1].bias)
    return m
class PixE(nn.Module):
    def __init__(s):
        super().__init__()
        s.inp = nn.Conv2d(192 + (16 if args.design == "pixz" else 0), W, 3, padding=1); s.res = nn.Sequential(*[Res(W) for _ in range(args.eb)]); s.out = nn.Conv2d(4 * W, 16, 1)
    def forward(s, x, base, zb, zf):
        h = F.pixel_unshuffle(x - base, 8)
        if args.design == "pixz": h = torch.cat([h, zf], 1)
        return zb + s.out(F.pixel_unshuffle(F.silu(s.res(s.inp(h))), 2))
class PixD(nn.Module):
    def __init__(s):
        super().__init__()
        s.lat = nn.Sequential(nn.Conv2d(32, W, 3, padding=1), Res(W))
        s.inp = nn.Conv2d(W // 4 + 192, W, 3, padding=1); s.res = nn.Sequential(*[Res(W) for _ in range(args.db)])
        s.out = nn.Conv2d(W, 192, 3, padding=1); nn.init.zeros_(s.out.weight); nn.init.zeros_(s.out.bias)
    def forward(s, zb, zd, base):
        l = F.pixel_shuffle(s.lat(torch.cat([zb, zd - zb], 1)), 2)
        return base + F.pixel_shuffle(s.out(F.silu(s.res(s.inp(torch.cat([l, F.pixel_unshuffle(base, 8)], 1))))), 8), None
class LatE(nn.Module):
    def __init__(s):
        super().__init__(); s.net = trunk(64 + 16, 16, args.eb)
    def forward(s, x, base, zb, zf):
        return zb + s.net(torch.cat([F.pixel_unshuffle(zf, 2), zb], 1))
class LatD(nn.Module):
    def __init__(s):
        super().__init__(); s.net = trunk(32, 64, args.db, zero=True)
    def forward(s, zb, zd, base):
        zh = F.interpolate(zb, scale_factor=2, mode="nearest") + F.pixel_shuffle(s.net(torch.cat([zb, zd - zb], 1)), 2)
        return None, zh
E, D = (PixE(), PixD()) if args.design in ("pix", "pixz") else (LatE(), LatD())
E, D = E.to(dev), D.to(dev)
params = list(E.parameters()) + list(D.parameters())
print("params", sum(p.numel() for p in params), flush=True)
opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1, s / max(1, args.steps)))))
g = torch.Generator(device="cpu").manual_seed(1 + args.seed)
def batch():
    k = args.crop // 16
    idx = torch.randint(len(X), (args.bs,), generator=g); gy = torch.randint(0, 16 - k + 1, (args.bs,), generator=g); gx = torch.randint(0, 16 - k + 1, (args.bs,), generator=g)
    flip = torch.rand(args.bs, generator=g) < 0.5
    xs, bs, zs, zfs = [], [], [], []
    for i, y, x_, f in zip(idx.tolist(), gy.tolist(), gx.tolist(), flip.tolist()):
        t = (X[i][:, y*16:(y+k)*16, x_*16:(x_+k)*16], B[i][:, y*16:(y+k)*16, x_*16:(x_+k)*16], Z[i][:, y:y+k, x_:x_+k], ZF[i][:, 2*y:2*(y+k), 2*x_:2*(x_+k)])
        if f: t = tuple(v.flip(-1) for v in t)
        xs.append(t[0]); bs.append(t[1]); zs.append(t[2]); zfs.append(t[3])
    return torch.stack(xs), torch.stack(bs), torch.stack(zs), torch.stack(zfs)
def recon(zb, zd, base):
    img, zh = D(zb, zd, base)
    if img is None: img = base_decode(vae, zh)
    return img, zh
hist = []
def dump():
    json.dump(dict(args=vars(args), a=pa, c=pc, hist=hist, s_per_step=(time.time() - t0) / max(1, hist[-1]['step'])), open(os.path.join(args.out, f'{args.name}.json'), 'w'))
def evaluate(step):
    with torch.no_grad():
        zd = E(val, va, vz, vzf); b, zh = recon(vz, zd, va); b = b.clamp(-1, 1)
        pb = psnr(b, val).mean().item()
        r = dict(step=step, b=pb, gap=(pb - pa) / (pc - pa), ssim=ssim(b, val).mean().item(), align=F.mse_loss(zd, vz).item(),
                 lat=F.mse_loss(zh, vzf).item() if zh is not None else None, t=time.time() - t0)
        hist.append(r); print(json.dumps(r), flush=True); dump()
t0 = time.time(); evaluate(0)
for step in range(args.steps):
    x, bl, zb, zf = batch()
    zd = E(x, bl, zb, zf)
    zds = zd + args.sigma * torch.randn_like(zd)
    img, zh = D(zb, zds, bl)
    loss = args.align * F.mse_loss(zd, zb)
    if zh is not None:
        loss = loss + F.mse_loss(zh, zf)
        if args.pixw > 0: loss = loss + args.pixw * (base_decode(vae, zh) - x).abs().mean()
    else:
        loss = loss + (img - x).abs().mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if (step + 1) % args.every == 0: evaluate(step + 1)
