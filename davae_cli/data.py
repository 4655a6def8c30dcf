"""Images from folders: listing, reading, deterministic random crops, and a step-indexed sampler.

The batch at a given step is a pure function of (seed, step, rank): resuming at step n reproduces the
data order exactly without storing any sampler state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from PIL import Image, ImageFile

from .errors import DavaeError, first_line

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
SKIMAGE_SOURCE = "skimage"  # the colour photos bundled with scikit-image (no download)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "hubble_deep_field",
                  "immunohistochemistry", "retina")

ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class MemoryImage:
    """An image already in memory (a held-out sample of a stream): an item of an `ImageSource`."""

    name: str
    array: np.ndarray = field(repr=False)


@dataclass
class ImageSource:
    """A list of image items: file paths, or ('skimage', name) for scikit-image's bundled photos."""

    items: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (path, reason) of unreadable files

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, n: int, seed: int) -> "ImageSource":
        """A seeded random `n` of the items, in their listed order (all of them when n is 0 or too large)."""
        if not n or len(self.items) <= n:
            return self
        keep = set(np.random.default_rng([seed, 5]).choice(len(self.items), size=n, replace=False).tolist())
        return ImageSource([it for i, it in enumerate(self.items) if i in keep], self.skipped)

    def name(self, i: int) -> str:
        it = self.items[i]
        if isinstance(it, MemoryImage):
            return it.name
        return it[1] if isinstance(it, tuple) else Path(it).stem


def list_images(inputs: Iterable[str | Path], check: bool = True, missing_ok: bool = False) -> ImageSource:
    """Images under `inputs` (files or folders, recursive, sorted). `skimage` names the bundled photos.

    With `check`, each file's header is read once; unreadable files are skipped and recorded. A
    missing input raises, or with `missing_ok` is recorded in `skipped` as "not found".
    """
    src = ImageSource()
    for inp in inputs:
        p = Path(inp).expanduser()
        if not p.exists() and str(inp) == SKIMAGE_SOURCE:
            src.items += [(SKIMAGE_SOURCE, n) for n in SKIMAGE_PHOTOS]
            continue
        if not p.exists():
            if missing_ok:
                src.skipped.append((str(inp), "not found"))
                continue
            raise DavaeError(f"input not found: {inp}")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        for f in files:
            if check:
                try:
                    with Image.open(f) as im:
                        im.size  # noqa: B018 - reading the header is the check
                except Exception as e:
                    src.skipped.append((str(f), first_line(e, 100)))
                    continue
            src.items.append(str(f))
    return src


@functools.lru_cache(maxsize=len(SKIMAGE_PHOTOS))
def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    arr = getattr(skimage.data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)
    arr = np.ascontiguousarray(arr[..., :3])
    arr.flags.writeable = False
    return arr


def read_image(item) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Raises on unreadable files."""
    if isinstance(item, MemoryImage):
        return item.array
    if isinstance(item, tuple):
        return _skimage_photo(item[1])
    with Image.open(item) as im:
        return np.asarray(im.convert("RGB"))


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1]."""
    arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def resize_short_side(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if min(h, w) == size:
        return arr
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BICUBIC))


def center_crop(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    H, W = arr.shape[:2]
    y, x = (H - h) // 2, (W - w) // 2
    return arr[y : y + h, x : x + w]


def fit_to_multiple(arr: np.ndarray, res: Optional[int], multiple: int) -> np.ndarray:
    """For encoding: optionally resize the short side to `res`, then centre-crop both sides down to a
    multiple of `multiple`. An image that already satisfies both is returned untouched."""
    if res is not None:
        arr = resize_short_side(arr, res)
    h, w = arr.shape[:2]
    th, tw = (h // multiple) * multiple, (w // multiple) * multiple
    if th == 0 or tw == 0:
        raise DavaeError(f"image of {w}x{h} is smaller than one latent token ({multiple} px)")
    return arr if (th, tw) == (h, w) else center_crop(arr, th, tw)


def random_crop(arr: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size crop at a random position; images smaller than `size` are first upscaled."""
    if min(arr.shape[:2]) < size:
        arr = resize_short_side(arr, size)
    h, w = arr.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return arr[y : y + size, x : x + size]


class StepCropDataset(torch.utils.data.Dataset):
    """Sample n (a global sample counter) -> a random crop, as a pure function of (seed, n).

    Epoch e visits the images in the order of a permutation seeded by (seed, e); the crop position
    of sample n is drawn from a generator seeded by (seed, n). Unreadable images (found at read time)
    fall through to the next image and are counted in `self.read_failures` (per worker).
    """

    def __init__(self, source: ImageSource, crop: int, seed: int, length: int):
        if len(source) == 0:
            raise DavaeError("no training images")
        self.source, self.crop, self.seed, self.length = source, crop, seed, length
        self.read_failures = 0

    def __len__(self) -> int:
        return self.length

    def _image_index(self, n: int) -> int:
        count = len(self.source)
        epoch, k = divmod(n, count)
        perm = np.random.default_rng([self.seed, epoch, 7]).permutation(count)
        return int(perm[k])

    def __getitem__(self, n: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, n, 11])
        idx = self._image_index(n)
        for attempt in range(len(self.source)):
            item = self.source.items[(idx + attempt) % len(self.source)]
            try:
                arr = read_image(item)
            except Exception:
                self.read_failures += 1
                continue
            return to_tensor(random_crop(arr, self.crop, rng))
        raise DavaeError("none of the training images could be read")


class StepSampler(torch.utils.data.Sampler):
    """Global sample counters of steps [step_from, step_to) for one process, generated lazily.

    Each step uses world * batch_size consecutive counters and this rank takes its contiguous slice,
    so the data order is a pure function of (seed, step) whatever the number of processes.
    """

    def __init__(self, step_from: int, step_to: int, batch_size: int, rank: int = 0, world: int = 1):
        self.step_from, self.step_to, self.batch_size, self.rank, self.world = step_from, step_to, batch_size, rank, world

    def __iter__(self):
        for step in range(self.step_from, self.step_to):
            first = (step * self.world + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        return max(0, self.step_to - self.step_from) * self.batch_size


def center_crops(source: ImageSource, size: int) -> tuple[torch.Tensor, list[str]]:
    """Held-out evaluation crops: short side resized to `size` if smaller, then a centred size x size crop."""
    out, names = [], []
    for i, item in enumerate(source.items):
        try:
            arr = read_image(item)
        except Exception:
            continue
        if min(arr.shape[:2]) < size:
            arr = resize_short_side(arr, size)
        out.append(to_tensor(center_crop(arr, size, size)))
        names.append(source.name(i))
    if not out:
        raise DavaeError("no readable evaluation images")
    return torch.stack(out), names


class CachedBaseCropDataset(torch.utils.data.Dataset):
    """Like `StepCropDataset`, but over images whose frozen-base outputs were computed once: sample n ->
    (x crop, baseline crop, z_base crop), crops aligned to the latent grid (`cell` pixels), a pure
    function of (seed, n). `images[i]` is (x (3, H, W), baseline (3, H, W), z_base (C, H/cell, W/cell))."""

    def __init__(self, images: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], crop: int, cell: int, seed: int,
                 length: int):
        if not images:
            raise DavaeError("no training images")
        if crop % cell:
            raise DavaeError(f"crop {crop} is not a multiple of the latent cell {cell}")
        for x, _, _ in images:
            if min(x.shape[-2:]) < crop:
                raise DavaeError(f"a training image of {x.shape[-1]}x{x.shape[-2]} is smaller than the {crop}² crop")
        self.images, self.crop, self.cell, self.seed, self.length = images, crop, cell, seed, length
        self.read_failures = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, n: int):
        count = len(self.images)
        epoch, k = divmod(n, count)
        idx = int(np.random.default_rng([self.seed, epoch, 7]).permutation(count)[k])
        rng = np.random.default_rng([self.seed, n, 11])
        x, base, z = self.images[idx]
        c, cells = self.cell, self.crop // self.cell
        gy = int(rng.integers(0, x.shape[-2] // c - cells + 1))
        gx = int(rng.integers(0, x.shape[-1] // c - cells + 1))
        ys, xs = slice(gy * c, (gy + cells) * c), slice(gx * c, (gx + cells) * c)
        return x[:, ys, xs], base[:, ys, xs], z[:, gy : gy + cells, gx : gx + cells]


@dataclass
class TrainingImages:
    """A trainer's images: everything listed (`all`, with the unreadable ones in `all.skipped`), the training
    share and the held-out share."""

    all: ImageSource
    train: ImageSource
    val: ImageSource


def split_validation(source: ImageSource, num_val: int, seed: int) -> tuple[ImageSource, ImageSource]:
    """Hold out `num_val` images (a seeded choice) unless that would leave too few to train on."""
    n = len(source)
    if num_val <= 0 or n < 2 * num_val:
        return source, ImageSource()
    idx = set(np.random.default_rng([seed, 3]).choice(n, size=num_val, replace=False).tolist())
    train = ImageSource([it for i, it in enumerate(source.items) if i not in idx], source.skipped)
    val = ImageSource([it for i, it in enumerate(source.items) if i in idx])
    return train, val


def training_images(data: list, val_data: Optional[list] = None, num_val: int = 0, seed: int = 0,
                    max_images: int = 0, max_val: int = 0) -> TrainingImages:
    """List `data` (and `val_data`); without `val_data`, hold out `num_val` of `data`; with `max_images`
    (`max_val`), train (evaluate on `val_data`) on a seeded random subset of that many. One-line error when nothing readable is left to train on."""
    source = list_images(data)
    if val_data:
        train, val = source, list_images(val_data)
    else:
        train, val = split_validation(source, num_val, seed)
    train = train.subset(max_images, seed)
    if val_data:
        val = val.subset(max_val, seed)
    if len(train) == 0:
        raise DavaeError(f"no readable images in {', '.join(map(str, data))}")
    return TrainingImages(source, train, val)


def step_loader(dataset, start_step: int, total: int, batch_size: int, rank: int, world: int,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of a step-indexed dataset for steps start_step..total, this process's share (StepSampler)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       sampler=StepSampler(start_step, total, batch_size, rank, world),
                                       drop_last=False)


@dataclass
class VAETrainingData:
    """The DA-VAE trainer's data, as one object: its images (listed and split), the step-indexed crop
    dataset (of the images, or of their cached base outputs), and the held-out centre crops."""

    images: TrainingImages
    dataset: torch.utils.data.Dataset
    val_images: Optional[torch.Tensor]

    def loader(self, start_step: int, total: int, batch_size: int, rank: int, world: int, num_workers: int = 0):
        return step_loader(self.dataset, start_step, total, batch_size, rank, world, num_workers)


def vae_training_data(images: TrainingImages, *, crop: int, resolution: int, seed: int, length: int,
                      granularity: int, base_cache: Optional[list] = None) -> VAETrainingData:
    """Crops of the training images (or, with `base_cache`, aligned crops of their cached base outputs) for
    `length` samples, and centre crops of the held-out images at `resolution`."""
    if base_cache is not None:
        dataset = CachedBaseCropDataset(base_cache, crop, granularity, seed, length)
    else:
        dataset = StepCropDataset(images.train, crop, seed, length)
    val = center_crops(images.val, resolution)[0] if len(images.val) else None
    return VAETrainingData(images, dataset, val)
