"""Data sources: digits, Fashion-MNIST, class-per-folder trees, and the ImageNet subsets."""

from ddfast.data.imagenet import (
    IMAGENET_WNIDS,
    SUBSETS,
    imagenet_index,
    is_imagenet_wnid,
    resolve_subset,
)
from ddfast.data.sources import (
    DEFAULT_FASHION_MNIST_ROOT,
    DEFAULT_FOLDER_RESOLUTION,
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    SOURCE_NAMES,
    SPLITS,
    ImageSource,
    center_crop,
    check_same_classes,
    load_image,
    open_source,
    read_idx,
)

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "DEFAULT_FOLDER_RESOLUTION",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_WNIDS",
    "IMAGE_EXTENSIONS",
    "SOURCE_NAMES",
    "SPLITS",
    "SUBSETS",
    "ImageSource",
    "center_crop",
    "check_same_classes",
    "imagenet_index",
    "is_imagenet_wnid",
    "load_image",
    "open_source",
    "read_idx",
    "resolve_subset",
]
