"""``--data photos``: colour crops of the natural photos that ship inside installed wheels.

No download: scikit-learn's sample images (``china.jpg``, ``flower.jpg``) and scikit-image's
``skimage/data`` photos (read as files with Pillow; scikit-image itself is never imported).
The test split is cut from *other photos* than the train split, so test crops are truly held out:

    train: china (sklearn), astronaut, chelsea, rocket, motorcycle_left (skimage)
    test:  flower (sklearn), coffee (skimage)

``photos`` gives 32x32 crops, ``photos:64`` 64x64 (``photos:N`` for N in PHOTO_SIZES).
Crops are drawn once, reproducibly (numpy seed 0): TRAIN_CROPS / TEST_CROPS positions, uniform
over each split's photos at full size and at half size (a box-filtered copy, for coarser
structure), half of them mirrored. Float32 (N, 3, N, N) in [0, 1], like every fastvae source.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from fastvae.bundled import bundled_file
from fastvae.errors import FastVAEError

PHOTO_SIZES = (32, 64)
TRAIN_CROPS, TEST_CROPS = 10_000, 1_000
TRAIN_PHOTOS = (("sklearn", "china.jpg"), ("skimage", "astronaut.png"), ("skimage", "chelsea.png"),
                ("skimage", "rocket.jpg"), ("skimage", "motorcycle_left.png"))
TEST_PHOTOS = (("sklearn", "flower.jpg"), ("skimage", "coffee.png"))
_FOLDERS = {"sklearn": ("sklearn", "datasets", "images"), "skimage": ("skimage", "data")}


def is_photos(source) -> bool:
    """Whether ``--data`` names this source (``photos`` or ``photos:N``)."""
    return str(source) == "photos" or str(source).startswith("photos:")


def crop_size(source: str) -> int:
    """The crop size of ``photos`` (32) or ``photos:N``; FastVAEError for other sizes."""
    text = str(source).partition(":")[2] or "32"
    if not text.isdigit() or int(text) not in PHOTO_SIZES:
        raise FastVAEError(f"--data {source}: use photos (32x32 crops) or photos:64 (64x64 crops)")
    return int(text)


def load_photos(source: str = "photos"):
    """The ``photos`` splits (``fastvae.data.Splits``): train and test crops from different photos."""
    from fastvae.data import Splits

    size = crop_size(source)
    rng = np.random.default_rng(0)
    train = _crops([_read(*p) for p in TRAIN_PHOTOS], TRAIN_CROPS, size, rng)
    test = _crops([_read(*p) for p in TEST_PHOTOS], TEST_CROPS, size, rng)
    return Splits(str(source), train, test, pixel_grid=255)  # crops of 8-bit photos


def photo_path(package: str, name: str) -> Path:
    """Where ``package`` (sklearn or skimage) keeps the photo ``name``; FastVAEError if absent."""
    top, *sub = _FOLDERS[package]
    path = bundled_file(top, *sub, name)
    if path is not None:
        return path
    if importlib.util.find_spec(top) is None:
        raise FastVAEError(f"--data photos needs the {top} package for {name}: pip install "
                           f"{'scikit-image' if top == 'skimage' else 'scikit-learn'}")
    raise FastVAEError(f"--data photos: {'/'.join(sub + [name])} is missing from the installed {top}; "
                       "reinstall it")


def _read(package: str, name: str) -> list[np.ndarray]:
    """The photo as uint8 (H, W, 3) at full size and at half size."""
    from PIL import Image

    with Image.open(photo_path(package, name)) as img:
        img = img.convert("RGB")
        half = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
        return [np.asarray(img), np.asarray(half)]


def _crops(photos: list[list[np.ndarray]], n: int, size: int, rng) -> torch.Tensor:
    """n random size x size crops, photo and scale uniform, half mirrored -> (n, 3, size, size)."""
    pool = [scaled for both in photos for scaled in both]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    which = rng.integers(len(pool), size=n)
    flips = rng.random(n) < 0.5
    for i, (k, flip) in enumerate(zip(which, flips)):
        image = pool[k]
        top = rng.integers(image.shape[0] - size + 1)
        left = rng.integers(image.shape[1] - size + 1)
        crop = image[top : top + size, left : left + size]
        out[i] = crop[:, ::-1] if flip else crop
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
