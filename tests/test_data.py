"""Tests of ddfast.data against real data and independent references."""

import gzip
import os
import pickle
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import ddfast.data.sources as sources_mod
from ddfast.data import (
    FASHION_MNIST_CLASSES,
    IMAGENET_WNIDS,
    SUBSETS,
    center_crop,
    check_same_classes,
    imagenet_index,
    open_source,
    resolve_subset,
)
from ddfast.errors import DataError

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# method.md section 6, in its order: (wnid, ImageNet index).
METHOD_TABLE = {
    "woof": [("n02096294", 193), ("n02093754", 182), ("n02111889", 258), ("n02088364", 162),
             ("n02086240", 155), ("n02089973", 167), ("n02087394", 159), ("n02115641", 273),
             ("n02099601", 207), ("n02105641", 229)],
    "nette": [("n01440764", 0), ("n02102040", 217), ("n02979186", 482), ("n03000684", 491),
              ("n03028079", 497), ("n03394916", 566), ("n03417042", 569), ("n03425413", 571),
              ("n03445777", 574), ("n03888257", 701)],
    "idc": [("n02869837", 452), ("n01749939", 64), ("n02488291", 374), ("n02107142", 236),
            ("n13037406", 993), ("n02091831", 176), ("n04517823", 882), ("n04589890", 904),
            ("n03062245", 503), ("n01773797", 74)],
}
KNOWN_INDEX = {w: i for pairs in METHOD_TABLE.values() for w, i in pairs}
WOOF = [w for w, _ in METHOD_TABLE["woof"]]
TENCH = "n01440764"  # not in ImageWoof


# ---------------------------------------------------------------- ImageNet table and subsets


def test_wnid_list_is_the_sorted_ilsvrc_set():
    assert len(IMAGENET_WNIDS) == 1000
    assert len(set(IMAGENET_WNIDS)) == 1000
    assert list(IMAGENET_WNIDS) == sorted(IMAGENET_WNIDS)
    assert all(re.fullmatch(r"n\d{8}", w) for w in IMAGENET_WNIDS)
    assert IMAGENET_WNIDS[0] == "n01440764" and IMAGENET_WNIDS[-1] == "n15075141"
    text = resources.files("ddfast.data").joinpath("imagenet_wnids.txt").read_text()
    assert text.splitlines() == list(IMAGENET_WNIDS)


def test_method_table_matches_positions_and_subset_order():
    for name, pairs in METHOD_TABLE.items():
        assert SUBSETS[name] == [w for w, _ in pairs]
        for wnid, index in pairs:
            assert IMAGENET_WNIDS[index] == wnid
            assert imagenet_index(wnid) == index


def test_resolve_subset():
    assert resolve_subset("WOOF") == WOOF
    assert resolve_subset(["n02111889", TENCH]) == ["n02111889", TENCH]
    assert resolve_subset(" n02111889, n01440764") == ["n02111889", TENCH]
    assert resolve_subset("n02111889") == ["n02111889"]
    with pytest.raises(DataError, match="woof"):
        resolve_subset("imagewolf")
    with pytest.raises(DataError, match="n09999999"):
        resolve_subset([TENCH, "n09999999"])
    with pytest.raises(DataError, match="n09999999"):
        resolve_subset("n09999999")
    with pytest.raises(DataError, match="more than once"):
        resolve_subset([TENCH, TENCH])
    with pytest.raises(DataError, match="empty"):
        resolve_subset([])
    with pytest.raises(DataError, match="n00000000"):
        imagenet_index("n00000000")


# ---------------------------------------------------------------- digits


def _digits_reference(split):
    """Independent walk of sklearn's raw array by the documented rule."""
    bunch = load_digits()
    seen = [0] * 10
    images, labels = [], []
    for img, y in zip(bunch.images, bunch.target, strict=True):
        is_test = seen[y] % 5 == 4
        seen[y] += 1
        if is_test == (split == "test"):
            images.append([[round(float(v) * 255 / 16) for v in row] for row in img])
            labels.append(int(y))
    return np.array(images, dtype=np.uint8), np.array(labels)


def test_digits_counts_and_stratification():
    train, test = open_source("digits", "train"), open_source("digits", "test")
    assert (len(train), len(test)) == (1442, 355)
    per_class = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert torch.bincount(test.labels, minlength=10).tolist() == [n // 5 for n in per_class]
    assert torch.bincount(train.labels, minlength=10).tolist() == [n - n // 5 for n in per_class]
    assert train.class_names == [str(c) for c in range(10)]
    assert train.cond_labels == list(range(10)) and train.files is None
    assert (train.channels, train.resolution, train.labels.dtype) == (1, 8, torch.int64)


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_values_match_sklearn(split):
    src = open_source("digits", split)
    ref_images, ref_labels = _digits_reference(split)
    got = src.images(range(len(src)))
    assert got.dtype == torch.uint8 and got.shape == (len(src), 1, 8, 8)
    assert np.array_equal(got[:, 0].numpy(), ref_images)
    assert np.array_equal(src.labels.numpy(), ref_labels)
    assert got.max() == 255 and got.min() == 0


def test_digits_determinism_resize_and_channels():
    a, b = open_source("digits", "train"), open_source("digits", "train")
    assert a.fingerprint() == b.fingerprint()
    assert torch.equal(a.images([5, 0, 5]), b.images(torch.tensor([5, 0, 5])))
    assert a.fingerprint() != open_source("digits", "test").fingerprint()
    big = open_source("digits", "train", resolution=16, channels=3)
    assert big.fingerprint() != a.fingerprint()
    out = big.images([7])
    assert out.shape == (1, 3, 16, 16)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    small = Image.fromarray(a.images([7])[0, 0].numpy())
    ref = np.asarray(small.resize((16, 16), Image.Resampling.BICUBIC))
    assert np.array_equal(out[0, 0].numpy(), ref)


def test_bad_options():
    with pytest.raises(DataError, match="root"):
        open_source("digits", "train", root="anywhere")
    with pytest.raises(DataError, match="subset"):
        open_source("digits", "train", subset="woof")
    with pytest.raises(DataError, match="fashion-mnist"):
        open_source("mnist", "train")
    with pytest.raises(DataError, match="'train' or 'test'"):
        open_source("digits", "val")
    with pytest.raises(DataError, match="channels"):
        open_source("digits", "train", channels=2)
    with pytest.raises(DataError, match="resolution"):
        open_source("digits", "train", resolution=0)
    src = open_source("digits", "test")
    for bad in ([len(src)], [-1], [0.5], torch.tensor([True, False])):
        with pytest.raises(DataError):
            src.images(bad)
    assert src.images([]).shape == (0, 1, 8, 8)


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist():
    if not FMNIST_ROOT.is_dir():
        pytest.fail(f"Fashion-MNIST is missing from {FMNIST_ROOT}: run "
                    "`apt-get install dataset-fashion-mnist` (the tests need the real files)")
    return open_source("fashion-mnist", "train"), open_source("fashion-mnist", "test")


def _raw_idx(name):
    return gzip.decompress((FMNIST_ROOT / f"{name}.gz").read_bytes())


def test_fashion_mnist_official_split(fmnist):
    train, test = fmnist
    assert (len(train), len(test)) == (60000, 10000)
    assert int(train.labels[0]) == 9 and int(test.labels[0]) == 9
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.class_names == FASHION_MNIST_CLASSES and train.class_names[9] == "Ankle boot"
    got = test.images([0, 9999])
    assert got.dtype == torch.uint8 and got.shape == (2, 1, 28, 28)
    # Independent parse: 16-byte header, then row-major 28x28 bytes.
    raw = np.frombuffer(_raw_idx("t10k-images-idx3-ubyte"), np.uint8, offset=16)
    assert np.array_equal(got[0, 0].numpy(), raw[:784].reshape(28, 28))
    assert np.array_equal(got[1, 0].numpy(), raw[-784:].reshape(28, 28))


def test_fashion_mnist_raw_copy_is_identical(fmnist, tmp_path):
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        (tmp_path / name).write_bytes(_raw_idx(name))
    for gz_src, split in zip(fmnist, ["train", "test"], strict=True):
        raw_src = open_source("fashion-mnist", split, root=str(tmp_path))
        assert torch.equal(raw_src.labels, gz_src.labels)
        every = range(len(gz_src))
        assert torch.equal(raw_src.images(every), gz_src.images(every))
        assert raw_src.fingerprint() == gz_src.fingerprint()


def test_fashion_mnist_resize_and_channels(fmnist):
    src = open_source("fashion-mnist", "test", resolution=32, channels=3)
    out = src.images([3, 1])
    assert out.shape == (2, 3, 32, 32)
    ref = Image.fromarray(fmnist[1].images([1])[0, 0].numpy()).resize((32, 32),
                                                                      Image.Resampling.BICUBIC)
    assert np.array_equal(out[1, 2].numpy(), np.asarray(ref))
    assert src.fingerprint() != fmnist[1].fingerprint()


def _write_test_split(folder, images=None, labels=None):
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte").write_bytes(images or _raw_idx("t10k-images-idx3-ubyte"))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(labels or _raw_idx("t10k-labels-idx1-ubyte"))
    return str(folder)


def test_fashion_mnist_damaged_files(tmp_path, monkeypatch):
    images = _raw_idx("t10k-images-idx3-ubyte")
    labels = _raw_idx("t10k-labels-idx1-ubyte")
    cases = {
        "truncated": (images[:-100], None, "holds"),
        "trailing": (images + b"\0", None, "holds"),
        "magic": (labels, None, "magic number 2049"),
        "header": (images[:10], None, "header"),
        "count": (None, labels[:4] + (9999).to_bytes(4, "big") + labels[8:-1], "labels"),
        "range": (None, labels[:-1] + bytes([10]), "label 10"),
    }
    for case, (img, lab, message) in cases.items():
        root = _write_test_split(tmp_path / case, img, lab)
        with pytest.raises(DataError, match=message):
            open_source("fashion-mnist", "test", root=root)
    bad_gz = tmp_path / "badgz"
    bad_gz.mkdir()
    gz = (FMNIST_ROOT / "t10k-images-idx3-ubyte.gz").read_bytes()
    (bad_gz / "t10k-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    (bad_gz / "t10k-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        open_source("fashion-mnist", "test", root=str(bad_gz))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        open_source("fashion-mnist", "train", root=str(bad_gz))
    monkeypatch.setattr(sources_mod, "DEFAULT_FASHION_MNIST_ROOT", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        open_source("fashion-mnist", "test")


# ---------------------------------------------------------------- image folders


def _rand(rng, h, w, c=3):
    shape = (h, w) if c == 1 else (h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _make_tree(root, classes, rng):
    """An ImageNet-layout tree: PNG/JPEG/GIF/BMP, grayscale, RGBA, palette, non-square."""
    arrays = {}
    for cls in classes:
        (root / cls).mkdir(parents=True)
        arrays[f"{cls}/x.png"] = _rand(rng, 12, 12)
        Image.fromarray(arrays[f"{cls}/x.png"]).save(root / cls / "x.png")
    gray, rgba, wide = _rand(rng, 24, 24, 1), _rand(rng, 36, 20, 4), _rand(rng, 45, 70)
    Image.fromarray(gray).save(root / WOOF[0] / "a.JPEG", quality=95)
    Image.fromarray(_rand(rng, 30, 40)).save(root / WOOF[0] / "Y.PNG")
    Image.fromarray(rgba).save(root / WOOF[1] / "rgba.png")
    Image.fromarray(_rand(rng, 18, 18)).convert("P").save(root / WOOF[1] / "pal.gif")
    Image.fromarray(wide).save(root / WOOF[2] / "wide.png")
    if TENCH in classes:
        Image.fromarray(_rand(rng, 14, 10)).save(root / TENCH / "t.bmp")
    # Ignored: hidden files and folders, other extensions, nested folders.
    (root / WOOF[0] / "notes.txt").write_text("not an image")
    Image.fromarray(gray).save(root / WOOF[0] / ".hidden.png")
    (root / ".cache").mkdir()
    Image.fromarray(gray).save(root / ".cache" / "z.png")
    (root / WOOF[3] / "nested").mkdir()
    Image.fromarray(gray).save(root / WOOF[3] / "nested" / "n.png")
    return {"gray": gray, "rgba": rgba, "wide": wide, **arrays}


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(1234)
    arrays = _make_tree(tmp_path / "train", WOOF + [TENCH], rng)
    _make_tree(tmp_path / "val", WOOF[:-1] + [TENCH], rng)
    return tmp_path, arrays


def test_folder_listing_order_and_labels(tree):
    root, _ = tree
    src = open_source("imagefolder", "train", root=str(root / "train"), resolution=16)
    assert src.class_names == sorted(WOOF + [TENCH])
    assert src.cond_labels == [KNOWN_INDEX[c] for c in src.class_names]
    first = src.class_names.index(WOOF[0])
    assert [f for f, y in zip(src.files, src.labels.tolist(), strict=True) if y == first] == [
        f"{WOOF[0]}/Y.PNG", f"{WOOF[0]}/a.JPEG", f"{WOOF[0]}/x.png"]
    assert len(src) == 11 + 2 + 2 + 1 + 1
    for f, y in zip(src.files, src.labels.tolist(), strict=True):
        assert f.split("/")[0] == src.class_names[y]
    assert all(".hidden" not in f and "nested" not in f and ".cache" not in f
               for f in src.files)


def test_folder_subsets(tree):
    root, _ = tree
    woof = open_source("imagefolder", "train", root=str(root / "train"), subset="woof")
    assert woof.class_names == WOOF
    assert woof.cond_labels == [i for _, i in METHOD_TABLE["woof"]]
    assert not any(f.startswith(TENCH) for f in woof.files)
    assert [woof.class_names[y] for y in woof.labels.tolist()] == [
        f.split("/")[0] for f in woof.files]
    assert woof.labels.tolist() == sorted(woof.labels.tolist())
    pick = open_source("imagefolder", "train", root=str(root / "train"),
                       subset=[WOOF[2], TENCH])
    assert pick.class_names == [WOOF[2], TENCH] and pick.cond_labels == [258, 0]
    assert pick.files == [f"{WOOF[2]}/wide.png", f"{WOOF[2]}/x.png", f"{TENCH}/t.bmp",
                          f"{TENCH}/x.png"]
    assert pick.labels.tolist() == [0, 0, 1, 1]


def test_non_wnid_folders_condition_on_class_index(tmp_path):
    for cls in ["dog", "cat", TENCH]:
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((9, 9, 3), 7, np.uint8)).save(tmp_path / cls / "i.png")
    src = open_source("imagefolder", "train", root=str(tmp_path), resolution=4)
    assert src.class_names == ["cat", "dog", TENCH] and src.cond_labels == [0, 1, 2]


def test_folder_preprocessing_against_independent_crop(tree):
    root, arrays = tree
    src = open_source("imagefolder", "train", root=str(root / "train"), resolution=16)
    out = src.images(range(len(src)))
    assert out.dtype == torch.uint8 and out.shape == (len(src), 3, 16, 16)
    at = {f: i for i, f in enumerate(src.files)}
    # 70x45 -> box-halve to 35x22 (22 < 32 stops) -> bicubic to 25x16 -> crop x 4..20.
    wide = Image.fromarray(arrays["wide"])
    ref = wide.resize((35, 22), Image.Resampling.BOX).resize((25, 16), Image.Resampling.BICUBIC)
    ref = np.asarray(ref.crop((4, 0, 20, 16))).transpose(2, 0, 1)
    got = out[at[f"{WOOF[2]}/wide.png"]].numpy()
    assert np.array_equal(got, ref)
    assert not np.array_equal(got, ref[:, :, ::-1])  # no horizontal flip here
    # 20x36 RGBA: no halving -> alpha dropped -> bicubic to 16x29 -> crop y 6..22.
    rgb = Image.fromarray(np.ascontiguousarray(arrays["rgba"][:, :, :3]))
    ref = np.asarray(rgb.resize((16, 29), Image.Resampling.BICUBIC).crop((0, 6, 16, 22)))
    assert np.array_equal(out[at[f"{WOOF[1]}/rgba.png"]].numpy(), ref.transpose(2, 0, 1))
    gray = out[at[f"{WOOF[0]}/a.JPEG"]]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    one = open_source("imagefolder", "train", root=str(root / "train"), resolution=16,
                      channels=1)
    ref = np.asarray(center_crop(wide.convert("L"), 16))
    assert np.array_equal(one.images([at[f"{WOOF[2]}/wide.png"]])[0, 0].numpy(), ref)
    assert torch.equal(src.images([3, 1]), out[[3, 1]])
    clone = pickle.loads(pickle.dumps(src))
    assert torch.equal(clone.images(torch.tensor([0, 4])), out[[0, 4]])


def test_center_crop_halves_with_box_first():
    img = Image.fromarray(_rand(np.random.default_rng(5), 130, 300))
    # Short side 130 >= 2*32 twice: 300x130 -> 150x65 -> 75x32, then 32 < 64 stops.
    ref = img.resize((150, 65), Image.Resampling.BOX).resize((75, 32), Image.Resampling.BOX)
    ref = ref.resize((75, 32), Image.Resampling.BICUBIC).crop((21, 0, 53, 32))
    assert np.array_equal(np.asarray(center_crop(img, 32)), np.asarray(ref))
    # Short side exactly 2R still halves: 64x40 -> 32x20, which already has short side 20.
    img = Image.fromarray(_rand(np.random.default_rng(6), 40, 64))
    ref = img.resize((32, 20), Image.Resampling.BOX).crop((6, 0, 26, 20))
    assert np.array_equal(np.asarray(center_crop(img, 20)), np.asarray(ref))


def test_folder_default_resolution_and_fingerprint(tree):
    root, _ = tree
    train = str(root / "train")
    src = open_source("imagefolder", "train", root=train)
    assert src.resolution == 256 and src.channels == 3
    assert src.images([0]).shape == (1, 3, 256, 256)
    fp = src.fingerprint()
    assert fp == open_source("imagefolder", "train", root=train).fingerprint()
    others = [open_source("imagefolder", "train", root=train, resolution=128),
              open_source("imagefolder", "train", root=train, channels=1),
              open_source("imagefolder", "train", root=train, subset="woof"),
              open_source("imagefolder", "test", root=train)]
    assert len({fp, *(o.fingerprint() for o in others)}) == 5
    path = root / "train" / WOOF[4] / "x.png"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = open_source("imagefolder", "train", root=train).fingerprint()
    assert touched != fp
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / WOOF[4] / "y.png")
    assert open_source("imagefolder", "train", root=train).fingerprint() not in (fp, touched)


def test_folder_errors(tree):
    root, _ = tree
    train, val = root / "train", root / "val"
    with pytest.raises(DataError, match="needs root"):
        open_source("imagefolder", "train")
    with pytest.raises(DataError, match="does not exist"):
        open_source("imagefolder", "train", root=str(root / "missing"))
    with pytest.raises(DataError, match="not a folder"):
        open_source("imagefolder", "train", root=str(train / WOOF[0] / "x.png"))
    (root / "bare").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        open_source("imagefolder", "train", root=str(root / "bare"))
    with pytest.raises(DataError, match="n09999999"):
        open_source("imagefolder", "train", root=str(train), subset=[WOOF[0], "n09999999"])
    with pytest.raises(DataError, match=f"{WOOF[-1]}.*{re.escape(str(val.resolve()))}|"
                                        f"{re.escape(str(val.resolve()))}.*{WOOF[-1]}"):
        open_source("imagefolder", "test", root=str(val), subset="woof")
    test = open_source("imagefolder", "test", root=str(val))
    with pytest.raises(DataError, match=WOOF[-1]):
        check_same_classes(open_source("imagefolder", "train", root=str(train)), test)
    check_same_classes(test, open_source("imagefolder", "test", root=str(val)))
    (val / "n02085620").mkdir()
    (val / "n02085620" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="n02085620"):
        open_source("imagefolder", "test", root=str(val))


def test_folder_corrupt_images_fail_at_decode(tree):
    root, _ = tree
    folder = root / "train" / WOOF[5]
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 certainly not a jpeg")
    src = open_source("imagefolder", "train", root=str(root / "train"), resolution=8)
    bad = src.files.index(f"{WOOF[5]}/bad.jpg")
    with pytest.raises(DataError, match="bad.jpg"):
        src.images([0, bad])
    png = (root / "train" / WOOF[2] / "wide.png").read_bytes()
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    src = open_source("imagefolder", "train", root=str(root / "train"), resolution=8)
    with pytest.raises(DataError, match="cut.png"):
        src.images([src.files.index(f"{WOOF[5]}/cut.png")])
