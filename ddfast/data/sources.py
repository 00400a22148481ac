"""Image sources: one split of one dataset, as uint8 tensors ready for the latent cache.

Three sources:

- ``digits``: scikit-learn's bundled 8x8 digits, rescaled from 0..16 to 0..255, with a fixed
  stratified split: per class, in dataset order, every 5th sample (class positions 4, 9, 14, ...)
  is a test sample, the others are train samples.
- ``fashion-mnist``: the IDX files (gzip or raw), by default the Debian package's folder.
- ``imagefolder``: a class-per-folder tree such as ImageNet's ``root/<wnid>/*.JPEG``, optionally
  restricted to an ImageNet subset; decoded lazily and preprocessed like DiT/ADM.

Every source is deterministic (no RNG anywhere) and carries a :meth:`ImageSource.fingerprint`
that changes whenever its content or preprocessing does, for use in cache keys.
"""

from __future__ import annotations

import gzip
import hashlib
import operator
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddfast.data.imagenet import imagenet_index, is_imagenet_wnid, resolve_subset
from ddfast.errors import DataError

SOURCE_NAMES = ("digits", "fashion-mnist", "imagefolder")
SPLITS = ("train", "test")
# The Debian package dataset-fashion-mnist installs the IDX files here.
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
DEFAULT_FOLDER_RESOLUTION = 256
# Bump when any preprocessing changes, so that old cache entries stop matching.
_PREPROCESS_VERSION = "pre1"
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


class ImageSource:
    """One split of one dataset.

    Attributes:
        name: "digits", "fashion-mnist" or "imagefolder".
        split: "train" or "test".
        class_names: dataset classes; the dataset class index is the position. Sorted, except
            for an ImageNet subset, which keeps the subset's own order.
        cond_labels: per dataset class, the label that conditions the DiT: the ImageNet index
            for wnid folders, else the class index itself.
        channels: 1 or 3.
        resolution: side length in pixels of every image returned.
        labels: (N,) int64 dataset class index per item.
        files: per item its file relative to the root (imagefolder, "/"-separated), else None.

    Sources hold only plain data, so they pickle (e.g. into DataLoader workers).
    """

    def __init__(self, *, name: str, split: str, class_names: list[str], cond_labels: list[int],
                 channels: int, resolution: int, labels: torch.Tensor, files: list[str] | None,
                 identity: str):
        self.name = name
        self.split = split
        self.class_names = class_names
        self.cond_labels = cond_labels
        self.channels = channels
        self.resolution = resolution
        self.labels = labels  # (N,) int64
        self.files = files
        self._fingerprint = (
            f"{name}-{split}-{resolution}px-{channels}ch-"
            + hashlib.sha256(identity.encode()).hexdigest()[:32]
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (f"ImageSource({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={len(self.class_names)}, {self.channels}x{self.resolution}x"
                f"{self.resolution})")

    def images(self, indices) -> torch.Tensor:
        """Preprocessed images of the items ``indices`` (a sequence, array or tensor of ints).

        Returns (n, C, R, R) uint8 in the order given.
        """
        idx = self._check_indices(indices)
        r = self.resolution
        return self._load(idx) if idx else torch.empty(0, self.channels, r, r, dtype=torch.uint8)

    def fingerprint(self) -> str:
        """A stable string that changes whenever content or preprocessing changes."""
        return self._fingerprint

    def _load(self, idx: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _check_indices(self, indices) -> list[int]:
        try:
            flat = indices.reshape(-1).tolist() if torch.is_tensor(indices) else list(indices)
            # Booleans would pass as 0/1 and silently turn a mask into indices.
            if any(isinstance(i, (bool, np.bool_)) for i in flat):
                raise TypeError("boolean indices")
            idx = [operator.index(i) for i in flat]
        except TypeError:
            raise DataError(
                f"images() takes a sequence or tensor of integer indices, got {type(indices)}: "
                "pass e.g. [0, 1, 2] or torch.arange(n), not floats, booleans or a mask"
            ) from None
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise DataError(f"indices {bad[:5]} are out of range for {self!r}: pass indices in "
                            f"0..{len(self) - 1}")
        return idx


class _ArraySource(ImageSource):
    """A small grayscale dataset held in memory as (N, H, W) uint8."""

    def __init__(self, pixels: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self._pixels = pixels  # (N, H, W) uint8

    def _load(self, idx: list[int]) -> torch.Tensor:
        pix = self._pixels[torch.tensor(idx, dtype=torch.long)]  # (n, H, W)
        if pix.shape[-1] != self.resolution:
            # Pillow's bicubic on each uint8 image, the same filter the folder source uses.
            size = (self.resolution, self.resolution)
            pix = torch.from_numpy(np.stack([
                np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BICUBIC))
                for p in pix.numpy()
            ]))  # (n, R, R)
        out = pix.unsqueeze(1)  # (n, 1, R, R)
        if self.channels == 3:
            out = out.repeat(1, 3, 1, 1)  # (n, 3, R, R)
        return out.contiguous()


class _FolderSource(ImageSource):
    """A class-per-folder image tree, decoded and preprocessed on demand."""

    def __init__(self, root: Path, **kwargs):
        super().__init__(**kwargs)
        self._root = root

    def _load(self, idx: list[int]) -> torch.Tensor:
        arrays = [load_image(self._root / self.files[i], self.resolution, self.channels)
                  for i in idx]
        batch = torch.from_numpy(np.stack(arrays))  # (n, R, R, C)
        return batch.permute(0, 3, 1, 2).contiguous()  # (n, C, R, R)


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """DiT/ADM center crop: the short side to ``resolution``, then the central square.

    While the short side is at least twice the target, halve the image with a box filter (cheap
    and alias-free); then resize bicubically so that the short side equals ``resolution``, and
    crop the central ``resolution`` x ``resolution`` square (offsets rounded down).
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         Image.Resampling.BICUBIC)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_image(path: str | os.PathLike, resolution: int, channels: int) -> np.ndarray:
    """Decode one image file, convert it to RGB (or L) and center-crop it.

    Alpha is dropped, palettes, grayscale and CMYK become RGB; ``channels=1`` then converts to
    L. No EXIF rotation and no flip (augmentation belongs to the consumer). Returns (R, R, C)
    uint8.
    """
    try:
        with Image.open(path) as im:
            im.load()
            # Palette images may carry transparency that converts cleanly only via RGBA.
            im = im.convert("RGBA") if im.mode in ("P", "PA") else im
            im = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}; delete or replace the file (or move "
                        "it out of the class folder)") from None
    if channels == 1:
        im = im.convert("L")
    arr = np.asarray(center_crop(im, resolution))  # (R, R, 3) or (R, R)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _check_options(name: str, split: str, resolution, channels) -> None:
    if name not in SOURCE_NAMES:
        raise DataError(f"unknown data source {name!r}: pass one of {list(SOURCE_NAMES)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: pass 'train' or 'test'")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1
                                   or isinstance(resolution, bool)):
        raise DataError(f"resolution must be a positive int, got {resolution!r}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")


def open_source(name: str, split: str, *, root: str | None = None,
                subset: str | list[str] | None = None, resolution: int | None = None,
                channels: int | None = None) -> ImageSource:
    """Open one split of a dataset.

    Args:
        name: "digits", "fashion-mnist" or "imagefolder".
        split: "train" or "test". For imagefolder, ``root`` must already be that split's root.
        root: the data folder: fashion-mnist defaults to the Debian package's folder, imagefolder
            requires it, digits takes none (it ships with scikit-learn).
        subset: imagefolder only: "woof", "nette", "idc" or a list of wnids; only those classes,
            in that order.
        resolution: output side; defaults to the native 8 (digits), 28 (fashion-mnist) or 256
            (imagefolder). The grayscale sets resize with Pillow bicubic per image.
        channels: 1 or 3; defaults to 1 for the grayscale sets (3 repeats the channel) and 3
            for imagefolder (1 converts to L).
    """
    _check_options(name, split, resolution, channels)
    if subset is not None and name != "imagefolder":
        raise DataError(f"subset applies only to imagefolder sources: drop subset= for {name!r}")
    if name == "digits":
        if root is not None:
            raise DataError("digits ships with scikit-learn and reads no folder: drop root=")
        return _open_digits(split, resolution, channels)
    if name == "fashion-mnist":
        return _open_fashion_mnist(split, root, resolution, channels)
    return _open_imagefolder(split, root, subset, resolution, channels)


def _open_digits(split: str, resolution, channels) -> ImageSource:
    """scikit-learn's digits with a fixed stratified split that needs no RNG.

    Split rule: within each class, the class's samples in dataset order are numbered 0, 1, 2, ...;
    those at positions 4, 9, 14, ... (position % 5 == 4) form the test split, all others the
    train split. Items keep dataset order. Pixel values 0..16 become round(v * 255 / 16).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8) in 0..16
    targets = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
    # Values are integers, so the only .5 case is 8 -> 127.5, which both rounding modes send to 128.
    pixels = np.rint(raw * 255.0 / 16.0).astype(np.uint8)  # (1797, 8, 8)
    position = np.zeros_like(targets)
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        position[members] = np.arange(members.size)
    keep = (position % 5 == 4) if split == "test" else (position % 5 != 4)
    pixels, targets = pixels[keep], targets[keep]
    identity = "|".join(["digits", split, _PREPROCESS_VERSION, _digest(pixels, targets)])
    return _ArraySource(
        torch.from_numpy(np.ascontiguousarray(pixels)),
        name="digits", split=split, class_names=[str(c) for c in range(10)],
        cond_labels=list(range(10)), channels=channels or 1, resolution=resolution or 8,
        labels=torch.from_numpy(targets), files=None, identity=identity,
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip or raw, told apart by content).

    ``magic`` is 2051 for images (N, rows, cols) or 2049 for labels (N,). The header and the
    data length are checked exactly.
    """
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}; re-download or reinstall it (apt-get "
                        "install --reinstall dataset-fashion-mnist in the default folder)"
                        ) from None
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    fix = "the file is damaged or of another kind: re-download or reinstall it"
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        raise DataError(f"IDX file {path} has magic number {found}, expected {magic}: {fix}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} ends inside its header: {fix}")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected or min(dims) == 0:
        raise DataError(f"IDX file {path} declares dims {dims} ({expected} bytes) but holds "
                        f"{len(data)} bytes: {fix}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_file(root: Path, stem: str) -> Path:
    # A raw copy wins over the gzip one: same bytes, no decompression.
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST file {stem} (or {stem}.gz) is missing from {root}: pass root= "
                    "a folder holding the four IDX files (apt-get install dataset-fashion-mnist "
                    "for the default one)")


def _open_fashion_mnist(split: str, root, resolution, channels) -> ImageSource:
    folder = Path(root if root is not None else DEFAULT_FASHION_MNIST_ROOT)
    if not folder.is_dir():
        hint = "pass root=" if root else "apt-get install dataset-fashion-mnist, or pass root="
        raise DataError(
            f"Fashion-MNIST folder {folder} does not exist or is not a folder: {hint} a folder "
            "holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
        )
    prefix = "train" if split == "train" else "t10k"
    images_path = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    pixels = read_idx(images_path, _IDX_IMAGES_MAGIC)  # (N, H, W)
    labels = read_idx(labels_path, _IDX_LABELS_MAGIC).astype(np.int64)  # (N,)
    if pixels.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {pixels.shape[0]} images but {labels_path} holds "
                        f"{labels.shape[0]} labels: they differ in origin, re-download both")
    if pixels.shape[1] != pixels.shape[2]:
        raise DataError(f"{images_path} holds non-square {pixels.shape[1:]} images: "
                        "pass square Fashion-MNIST images")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_path} holds label {labels.max()} outside 0..9: re-download it")
    identity = "|".join(["fashion-mnist", split, _PREPROCESS_VERSION, _digest(pixels, labels)])
    return _ArraySource(
        torch.from_numpy(pixels),
        name="fashion-mnist", split=split, class_names=list(FASHION_MNIST_CLASSES),
        cond_labels=list(range(len(FASHION_MNIST_CLASSES))), channels=channels or 1,
        resolution=resolution or int(pixels.shape[1]), labels=torch.from_numpy(labels),
        files=None, identity=identity,
    )


def _visible(entries) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _list_class(root: Path, cls: str) -> list[tuple[str, int, int]]:
    """(file name, size, mtime_ns) of the images directly inside root/cls, sorted by name."""
    with os.scandir(root / cls) as it:
        entries = _visible(it)
    files = []
    for e in entries:
        if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
            st = e.stat()
            files.append((e.name, st.st_size, st.st_mtime_ns))
    if not files:
        raise DataError(f"class folder {root / cls} holds no images (extensions: "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}; nested folders are not searched):"
                        " add images or remove the folder")
    return files


def _open_imagefolder(split: str, root, subset, resolution, channels) -> ImageSource:
    if root is None:
        raise DataError(f"imagefolder needs root=: pass the folder of the {split} split, laid out "
                        "as root/<class>/<image> (e.g. ImageNet's train/ or class-sorted val/)")
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a folder: pass root= the "
                        f"{split} split's folder, laid out as root/<class>/<image>")
    folder = folder.resolve()
    with os.scandir(folder) as it:
        present = [e.name for e in _visible(it) if e.is_dir()]
    if not present:
        raise DataError(f"image folder {folder} has no class folders: lay it out as "
                        "root/<class>/<image>, one folder per class")
    wnids = resolve_subset(subset) if subset is not None else None
    if wnids is not None:
        have = set(present)
        missing = [w for w in wnids if w not in have]
        if missing:
            raise DataError(f"the {split} root {folder} lacks class folders {missing} of the "
                            "subset: pass the root holding every subset class, or another subset")
        class_names = wnids
    else:
        class_names = present
    if all(is_imagenet_wnid(c) for c in class_names):
        cond_labels = [imagenet_index(c) for c in class_names]
    else:
        # Not an ImageNet tree: the DiT is conditioned on the dataset class itself.
        cond_labels = list(range(len(class_names)))
    files, labels, digest = [], [], hashlib.sha256()
    for c, cls in enumerate(class_names):
        for fname, size, mtime in _list_class(folder, cls):
            files.append(f"{cls}/{fname}")
            labels.append(c)
            digest.update(f"{cls}/{fname}\0{size}\0{mtime}\n".encode())
    channels = channels or 3
    resolution = resolution or DEFAULT_FOLDER_RESOLUTION
    identity = "|".join(["imagefolder", split, _PREPROCESS_VERSION, str(folder),
                         ",".join(class_names), digest.hexdigest()])
    return _FolderSource(
        folder, name="imagefolder", split=split, class_names=list(class_names),
        cond_labels=cond_labels, channels=channels, resolution=resolution,
        labels=torch.tensor(labels, dtype=torch.int64), files=files, identity=identity,
    )


def check_same_classes(train: ImageSource, test: ImageSource) -> None:
    """Raise DataError unless two splits have the same classes in the same order."""
    if train.class_names == test.class_names:
        return
    if all(is_imagenet_wnid(c) for c in train.class_names):
        fix = f"open both with the same subset, e.g. subset={train.class_names!r}"
    else:
        fix = "give both roots the same class folders"
    only_train = [c for c in train.class_names if c not in test.class_names]
    only_test = [c for c in test.class_names if c not in train.class_names]
    raise DataError(f"the {train.split} and {test.split} splits differ in classes (only in "
                    f"{train.split}: {only_train}, only in {test.split}: {only_test}, or in "
                    f"another order): {fix}")

