"""Validation images: real photographs, preprocessed exactly as the manifest states.

The default set is the photographs bundled in scikit-image's wheel (no network).
Real images matter: noise inputs keep activations small and hide fp16 and
quantisation drift that photographs expose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .inputs import InputError

# crop_pct of the authors' evaluation transform (Resize(256/224 * size), CenterCrop(size))
CROP_PCT = 0.875
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
)


class ImageDataError(InputError):
    pass


@dataclass
class ImageBatch:
    """Images as an app would hand them over (uint8 RGB, NHWC) and as the model takes them (float NCHW)."""

    names: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8 RGB after resize and centre crop
    tensor: np.ndarray  # (N, 3, H, W) float32, normalised with mean/std

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, size: int):
        """Consecutive sub-batches of exactly ``size`` images (a static-batch artifact needs exactly that)."""
        for i in range(0, len(self) - size + 1, size):
            yield ImageBatch(self.names[i : i + size], self.images[i : i + size], self.tensor[i : i + size])


def default_image_paths() -> list[Path]:
    import skimage.data

    root = Path(skimage.data.__file__).parent
    return [root / n for n in _SKIMAGE_PHOTOS if (root / n).exists()]


def folder_image_paths(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageDataError(f"--data {str(folder)!r} is not a folder; pass a folder of .jpg/.png images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ImageDataError(f"--data {str(folder)!r} holds no .jpg/.png images; pass a folder with photographs")
    return paths


def load_rgb(path: Path, size: tuple[int, int], crop_pct: float = CROP_PCT) -> np.ndarray:
    """Resize so the image covers size/crop_pct (bicubic), centre-crop to size; uint8 RGB (H, W, 3)."""
    from PIL import Image  # here, not at the top: the worker on an ARM64 target has no Pillow

    h, w = size
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(h / crop_pct / im.height, w / crop_pct / im.width)
        rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((rw, rh), Image.BICUBIC)
        left, top = (rw - w) // 2, (rh - h) // 2
        return np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.uint8)


def normalise(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW: (x / 255 - mean) / std per channel."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_images(
    size: tuple[int, int], mean, std, folder: str | Path | None = None, limit: int | None = None
) -> ImageBatch:
    paths = folder_image_paths(folder) if folder is not None else default_image_paths()
    if limit:
        paths = paths[:limit]
    names, arrays = [], []
    for p in paths:
        try:
            arrays.append(load_rgb(p, size))
            # relative to --data, so a class-per-subfolder layout can be read back from the name
            names.append(p.relative_to(folder).as_posix() if folder is not None else p.name)
        except OSError:  # PIL's UnidentifiedImageError is one
            continue  # a broken file among many is skipped; none readable is an error below
    if not arrays:
        where = f"--data {str(folder)!r}" if folder is not None else "the default image set"
        raise ImageDataError(f"no readable image in {where}; pass --data with a folder of .jpg/.png photographs")
    images = np.stack(arrays)
    return ImageBatch(names, images, normalise(images, mean, std))


# views of each photograph for calibration: (crop_pct, mirrored); validation uses (CROP_PCT, not mirrored)
CALIBRATION_VIEWS = ((1.0, True), (0.75, False), (0.6, True))


def load_calibration(size: tuple[int, int], mean, std, folder: str | Path | None = None, count: int = 32) -> np.ndarray:
    """Images to calibrate int8 activations: each photograph mirrored and cropped wider or tighter than for
    validation, so that calibration and validation inputs are never the same pixels. Views are taken
    photograph by photograph until ``count``; a folder with too few photographs gives fewer (the caller
    says so)."""
    paths = folder_image_paths(folder) if folder is not None else default_image_paths()
    arrays = []
    for crop_pct, flip in CALIBRATION_VIEWS:
        for p in paths:
            try:
                a = load_rgb(p, size, crop_pct)
            except OSError:
                continue
            arrays.append(a[:, ::-1] if flip else a)
            if len(arrays) >= count:
                return normalise(np.stack(arrays), mean, std)
    if not arrays:
        raise ImageDataError("no readable image for calibration; pass --data with a folder of photographs")
    return normalise(np.stack(arrays), mean, std)


# an ImageNet-1k class each bundled photograph may stand for, to make a labelled set of them (a demonstration only)
PHOTO_CLASSES = {
    "astronaut.png": "space shuttle",
    "chelsea.png": "tabby",
    "coffee.png": "espresso",
    "rocket.jpg": "missile",
    "motorcycle_left.png": "moped",
    "hubble_deep_field.jpg": "planetarium",
    "retina.jpg": "jellyfish",
    "ihc.png": "brain coral",
    "camera.png": "tripod",
    "coins.png": "puck",
    "moon.png": "volcano",
    "brick.png": "stone wall",
}


def write_photo_set(
    folder: str | Path, count: int, classes: list[str] | None = None, seed: int = 0, side: int = 288
) -> Path:
    """``count`` JPEG views of the bundled photographs (random crops of 55-100% of the shorter side, mirrored at
    random, ``side`` pixels square) in class subfolders of ``folder``: a labelled set made without a network.

    Each photograph keeps one class: ``classes[i % len(classes)]`` for the i-th photograph, or, without
    ``classes``, the ImageNet-1k class of :data:`PHOTO_CLASSES`.
    """
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    photos = default_image_paths()
    opened = {}
    for k in range(count):
        i = k % len(photos)
        path = photos[i]
        if path not in opened:
            with Image.open(path) as im:
                opened[path] = im.convert("RGB")
        im = opened[path]
        cls = classes[i % len(classes)] if classes else PHOTO_CLASSES[path.name]
        crop = int(min(im.size) * rng.uniform(0.55, 1.0))
        left = int(rng.integers(0, im.width - crop + 1))
        top = int(rng.integers(0, im.height - crop + 1))
        view = im.crop((left, top, left + crop, top + crop)).resize((side, side), Image.BICUBIC)
        if rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        dest = folder / cls / f"{path.stem}-{k:06d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        view.save(dest, quality=90)
    return folder
