"""ImageNet-1k class ids (wnids) and the three ImageNet subsets of the distillation literature.

The conditioning label of an ImageNet class for a pretrained class-conditional DiT is its index
in the sorted list of the 1000 ILSVRC-2012 wnids (``n01440764`` is 0, ``n15075141`` is 999). The
list ships as package data, ``imagenet_wnids.txt``, one wnid a line, already sorted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources

from ddfast.errors import DataError

_WNID_FILE = "imagenet_wnids.txt"


def _load_wnids() -> tuple[str, ...]:
    """Read the packaged wnid list and check it is the complete, sorted ILSVRC-2012 set."""
    text = resources.files(__package__).joinpath(_WNID_FILE).read_text(encoding="ascii")
    wnids = tuple(line.strip() for line in text.splitlines() if line.strip())
    # A damaged install would silently shift every conditioning label, so refuse it outright.
    if len(wnids) != 1000 or len(set(wnids)) != 1000 or list(wnids) != sorted(wnids):
        raise DataError(
            f"the packaged ImageNet wnid list ddfast/data/{_WNID_FILE} is damaged (it must hold "
            f"the 1000 sorted ILSVRC-2012 wnids, it holds {len(wnids)} lines): reinstall ddfast"
        )
    return wnids


# The 1000 ILSVRC-2012 wnids in sorted order: position = ImageNet class index.
IMAGENET_WNIDS: tuple[str, ...] = _load_wnids()
_INDEX: dict[str, int] = {wnid: i for i, wnid in enumerate(IMAGENET_WNIDS)}

# The subsets in the order the distillation literature (IDC, Minimax, this paper) lists them;
# a subset's dataset class index is the position in its list.
SUBSETS: dict[str, list[str]] = {
    "woof": [
        "n02096294", "n02093754", "n02111889", "n02088364", "n02086240",
        "n02089973", "n02087394", "n02115641", "n02099601", "n02105641",
    ],
    "nette": [
        "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
        "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
    ],
    "idc": [
        "n02869837", "n01749939", "n02488291", "n02107142", "n13037406",
        "n02091831", "n04517823", "n04589890", "n03062245", "n01773797",
    ],
}


def is_imagenet_wnid(name: str) -> bool:
    """True when ``name`` is one of the 1000 ILSVRC-2012 wnids."""
    return name in _INDEX


def imagenet_index(wnid: str) -> int:
    """ImageNet-1k class index of ``wnid`` (its position in the sorted wnid list)."""
    try:
        return _INDEX[wnid]
    except KeyError:
        raise DataError(
            f"{wnid!r} is not an ILSVRC-2012 wnid: pass one of the 1000 ImageNet-1k class ids "
            "(like 'n02096294'), see ddfast.data.IMAGENET_WNIDS"
        ) from None


def resolve_subset(subset: str | Sequence[str]) -> list[str]:
    """The wnids of a named subset ("woof", "nette", "idc") or of an explicit wnid list.

    The order given is kept: it defines the dataset class indices. An explicit list must hold
    distinct ILSVRC-2012 wnids; a string of comma-separated wnids counts as such a list.
    """
    if isinstance(subset, str):
        key = subset.strip().lower()
        if key in SUBSETS:
            return list(SUBSETS[key])
        parts = [p.strip() for p in subset.split(",") if p.strip()]
        if not parts or not all(re.fullmatch(r"n\d{8}", p) for p in parts):
            raise DataError(
                f"unknown ImageNet subset {subset!r}: pass one of {sorted(SUBSETS)} or a list of "
                "wnids such as ['n02096294', 'n02093754']"
            )
        subset = parts
    wnids = list(subset)
    if not wnids:
        raise DataError("the subset wnid list is empty: pass at least one wnid, or subset=None")
    bad = [w for w in wnids if not isinstance(w, str)]
    if bad:
        raise DataError(f"subset entries must be wnid strings, got {bad!r}: pass e.g. 'n02096294'")
    unknown = [w for w in wnids if w not in _INDEX]
    if unknown:
        raise DataError(
            f"unknown wnids in the subset: {unknown}; pass ILSVRC-2012 wnids (see "
            "ddfast.data.IMAGENET_WNIDS) or a named subset: " + ", ".join(sorted(SUBSETS))
        )
    dupes = sorted({w for w in wnids if wnids.count(w) > 1})
    if dupes:
        raise DataError(f"the subset lists {dupes} more than once: list each wnid once")
    return wnids
