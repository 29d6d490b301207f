"""Data: every source loads from files in its real on-disk format; splits, augmentation and the cache
behave as documented. Real datasets are never downloaded here: the tests write tiny ones."""

import dataclasses
import hashlib
import json
import math
import os
import pickle
import threading
import time
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

import sweeper.data.splits as splits_module
from sweeper.config import DataConfig
from sweeper.data import DATASETS, DatasetUnavailable, DeviceData, load_splits
from sweeper.data.cache import cache_root, cached

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A fresh cache per test: no test sees another's decoded files."""
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path / "cache"))


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


# ---- real on-disk formats ---------------------------------------------------------------------------


def _write_cifar10(root, n_per_batch=6, n_test=8):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for name in names:
        _pickle(base / name, {"data": RNG.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                              "labels": list(RNG.integers(0, 10, n_per_batch))})
    _pickle(base / "test_batch", {"data": RNG.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                                  "labels": list(range(n_test))})
    _pickle(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return base, names


@pytest.fixture
def cifar10(tmp_path, monkeypatch):
    root = tmp_path / "data"
    base, names = _write_cifar10(root)
    # torchvision verifies each file's md5 against the official release; point it at ours instead
    # (the check itself stays on, so a corrupted file is still caught).
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[n, _md5(base / n)] for n in names])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", _md5(base / "test_batch")]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": _md5(base / "batches.meta")})
    return root


def test_cifar10_pickles_load_through_torchvision(cifar10):
    s = load_splits(DataConfig(name="cifar10", dir=str(cifar10), val_fraction=0.2), seed=0)
    assert s.train_x.dtype == torch.uint8 and s.train_x.shape[1:] == (3, 32, 32)
    assert s.train_y.dtype == torch.int64 and s.test_y.dtype == torch.int64
    assert len(s.train_y) + len(s.val_y) == 30 and len(s.val_y) == 6
    assert s.test_y.tolist() == list(range(8))  # the official test split, kept apart, in order
    assert s.num_classes == 10 and s.classes[0] == "c0" and s.name == "cifar10"
    assert int(s.train_y.min()) >= 0 and int(s.train_y.max()) < 10
    # Pixels arrive in the pickles' layout: 1024 red, 1024 green, 1024 blue, row-major.
    raw = pickle.load(open(cifar10 / "cifar-10-batches-py" / "test_batch", "rb"))["data"]
    assert torch.equal(s.test_x[0], torch.from_numpy(raw[0].reshape(3, 32, 32)))


def test_cifar10_resizes_once_on_request(cifar10):
    s = load_splits(DataConfig(name="cifar10", dir=str(cifar10), resolution=48), seed=0)
    assert s.train_x.shape[1:] == (3, 48, 48) and s.test_x.shape[1:] == (3, 48, 48)


def test_cifar100_pickles_load_with_fine_labels(tmp_path, monkeypatch):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    _pickle(base / "train", {"data": RNG.integers(0, 256, (20, 3072), dtype=np.uint8),
                             "fine_labels": list(range(20)), "coarse_labels": [0] * 20})
    _pickle(base / "test", {"data": RNG.integers(0, 256, (5, 3072), dtype=np.uint8),
                            "fine_labels": [99, 98, 97, 96, 95], "coarse_labels": [1] * 5})
    _pickle(base / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                            "coarse_label_names": [f"g{i}" for i in range(20)]})
    monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", _md5(base / "train")]])
    monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", _md5(base / "test")]])
    monkeypatch.setattr(tvd.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names",
                                               "md5": _md5(base / "meta")})
    s = load_splits(DataConfig(name="cifar100", dir=str(tmp_path)), seed=0)
    assert s.num_classes == 100 and s.classes[99] == "f99"
    assert s.test_y.tolist() == [99, 98, 97, 96, 95]
    assert sorted(s.train_y.tolist() + s.val_y.tolist()) == list(range(20))


def test_stl10_binaries_load_at_96_and_resize_on_request(tmp_path, monkeypatch):
    base = tmp_path / "stl10_binary"
    base.mkdir()
    train_x = RNG.integers(0, 256, (12, 3, 96, 96), dtype=np.uint8)
    files = {"train_X.bin": train_x,
             "train_y.bin": np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2], dtype=np.uint8),
             "unlabeled_X.bin": RNG.integers(0, 256, 1 * 3 * 96 * 96, dtype=np.uint8),
             "test_X.bin": RNG.integers(0, 256, 4 * 3 * 96 * 96, dtype=np.uint8),
             "test_y.bin": np.array([10, 9, 8, 7], dtype=np.uint8)}
    for name, array in files.items():
        array.tofile(base / name)
    # No class_names.txt: the official names stand in.
    monkeypatch.setattr(tvd.STL10, "train_list", [[n, _md5(base / n)] for n in
                                                  ("train_X.bin", "train_y.bin", "unlabeled_X.bin")])
    monkeypatch.setattr(tvd.STL10, "test_list", [[n, _md5(base / n)] for n in
                                                 ("test_X.bin", "test_y.bin")])
    s = load_splits(DataConfig(name="stl10", dir=str(tmp_path), val_fraction=0.25), seed=0)
    assert s.train_x.shape[1:] == (3, 96, 96) and s.num_classes == 10 and s.classes[0] == "airplane"
    assert s.test_y.tolist() == [9, 8, 7, 6]  # 1-based on disk
    # The files are column-major per channel; the decoded image is the transpose.
    all_x = torch.cat([s.train_x, s.val_x])
    assert any(torch.equal(img, torch.from_numpy(train_x[0]).transpose(1, 2)) for img in all_x)
    small = load_splits(DataConfig(name="stl10", dir=str(tmp_path), resolution=32), seed=0)
    assert small.train_x.shape[1:] == (3, 32, 32) and small.train_x.dtype == torch.uint8


def _png(path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_one_truncated_image_among_good_ones_is_named(tmp_path):
    """'dataset ... is incomplete: Truncated File Read' named no file: a user with thousands of
    images could not find the bad one."""
    root = tmp_path / "images"  # not tmp_path: the test's cache is a folder there
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        for i in range(4):
            _png(root / cls / f"{i}.png", colour)
    bad = root / "dog" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header survives, the pixel data does not
    with pytest.raises(DatasetUnavailable) as info:
        load_splits(DataConfig(name="imagefolder", dir=str(root), resolution=16), seed=0)
    assert f"is incomplete: {bad}: " in str(info.value) and "remove or replace that file" in str(info.value)


def test_imagefolder_with_train_and_test_folders(tmp_path):
    for split, n in (("train", 5), ("test", 2)):
        for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", colour)
    s = load_splits(DataConfig(name="imagefolder", dir=str(tmp_path), resolution=16,
                               val_fraction=0.2), seed=0)
    assert s.classes == ["cat", "dog"] and s.num_classes == 2
    assert s.train_x.shape[1:] == (3, 16, 16) and s.train_x.dtype == torch.uint8
    assert len(s.test_y) == 4 and len(s.train_y) + len(s.val_y) == 10
    red = s.test_x[s.test_y == 0].float()
    assert red[:, 0].mean() > 250 and red[:, 2].mean() < 5  # colours survive the decode


def test_imagefolder_flat_tree_carves_a_fixed_test_split_at_native_64(tmp_path):
    tmp_path = tmp_path / "tree"  # apart from the cache, which also lives in tmp_path
    for cls, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        for i in range(10):
            _png(tmp_path / cls / f"{i}.jpg", colour, size=(80, 50))
    s0 = load_splits(DataConfig(name="imagefolder", dir=str(tmp_path)), seed=0)
    s1 = load_splits(DataConfig(name="imagefolder", dir=str(tmp_path)), seed=1)
    assert s0.train_x.shape[1:] == (3, 64, 64) and s0.classes == ["a", "b", "c"]
    assert len(s0.test_y) == 6 and len(s0.train_y) + len(s0.val_y) == 24
    assert torch.equal(s0.test_x, s1.test_x) and torch.equal(s0.test_y, s1.test_y)


def test_imagefolder_test_folder_missing_a_class_keeps_training_label_numbers(tmp_path):
    tmp_path = tmp_path / "tree"  # apart from the cache, which also lives in tmp_path
    for cls, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        for i in range(3):
            _png(tmp_path / "train" / cls / f"{i}.png", colour)
    _png(tmp_path / "val" / "c" / "0.png", (0, 0, 255))  # val/ serves as the test split
    s = load_splits(DataConfig(name="imagefolder", dir=str(tmp_path), resolution=8), seed=0)
    assert s.classes == ["a", "b", "c"] and s.test_y.tolist() == [2]  # 'c', not ImageFolder's 0


def test_imagefolder_cache_follows_changes_to_the_folder(tmp_path):
    tmp_path = tmp_path / "tree"
    for cls in ("a", "b"):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", (9, 9, 9))
    cfg = DataConfig(name="imagefolder", dir=str(tmp_path), resolution=8)
    before = load_splits(cfg, seed=0)
    time.sleep(0.01)  # distinct directory mtime even on coarse clocks
    _png(tmp_path / "a" / "new.png", (9, 9, 9))
    after = load_splits(cfg, seed=0)
    assert len(after.train_y) + len(after.val_y) + len(after.test_y) == \
        len(before.train_y) + len(before.val_y) + len(before.test_y) + 1


def test_food101_meta_split_and_images(tmp_path):
    base = tmp_path / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "ramen": ["ramen/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "ramen": ["ramen/5"]}}
    (base / "meta").mkdir(parents=True)
    for split, classes in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(classes))
        for cls, rels in classes.items():
            for rel in rels:
                path = base / "images" / f"{rel}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                colour = (0, 200, 0) if cls == "ramen" else (200, 0, 0)
                Image.new("RGB", (60, 80), colour).save(path)
    s = load_splits(DataConfig(name="food101", dir=str(tmp_path), val_fraction=0.34), seed=0)
    assert s.train_x.shape[1:] == (3, 64, 64)  # Food-101's default decode size
    assert s.classes == ["apple_pie", "ramen"]
    assert sorted(s.test_y.tolist()) == [0, 1]
    ramen = s.test_x[s.test_y == 1][0].float()
    assert ramen[1].mean() > 190 and ramen[0].mean() < 10  # labels travel with their images


# ---- absent, corrupted, offline ---------------------------------------------------------------------


@pytest.mark.parametrize("name,looked_for", [("cifar10", "cifar-10-batches-py"),
                                             ("cifar100", "cifar-100-python"),
                                             ("stl10", "stl10_binary"), ("food101", "food-101")])
def test_absent_dataset_names_itself_the_directory_and_the_alternatives(tmp_path, name, looked_for):
    with pytest.raises(DatasetUnavailable) as info:
        load_splits(DataConfig(name=name, dir=str(tmp_path / "nowhere")), seed=0)
    text = str(info.value)
    assert repr(name) in text and str(tmp_path / "nowhere") in text and looked_for in text
    assert "--data-dir" in text and "data.download=true" in text and "data.name=digits" in text


def test_absent_dataset_without_dir_looks_in_the_cache(tmp_path):
    with pytest.raises(DatasetUnavailable) as info:
        load_splits(DataConfig(name="cifar10"), seed=0)
    assert str(cache_root() / "data" / "cifar10") in str(info.value)


def test_corrupted_files_are_told_apart_from_absent_ones(cifar10):
    with open(cifar10 / "cifar-10-batches-py" / "data_batch_3", "ab") as f:
        f.write(b"junk")
    with pytest.raises(DatasetUnavailable, match="rejected it.*md5") as info:
        load_splits(DataConfig(name="cifar10", dir=str(cifar10)), seed=0)
    assert str(cifar10) in str(info.value)


def test_download_offline_fails_cleanly(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetUnavailable, match="download failed.*name resolution") as info:
        load_splits(DataConfig(name="cifar10", dir=str(tmp_path), download=True), seed=0)
    assert "'cifar10'" in str(info.value) and str(tmp_path) in str(info.value)


def test_imagefolder_needs_a_directory(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"data.dir=None.*needs data.dir"):
        load_splits(DataConfig(name="imagefolder"), seed=0)
    with pytest.raises(DatasetUnavailable, match="not found") as info:
        load_splits(DataConfig(name="imagefolder", dir=str(tmp_path / "missing")), seed=0)
    assert str(tmp_path / "missing") in str(info.value)
    assert "data.download" not in str(info.value)  # nothing to download for a user's folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetUnavailable, match="class folder"):
        load_splits(DataConfig(name="imagefolder", dir=str(tmp_path / "empty")), seed=0)


def test_registry_names_match_the_contract():
    assert sorted(DATASETS) == ["cifar10", "cifar100", "digits", "food101", "imagefolder", "stl10",
                                "synthetic"]
    with pytest.raises(ValueError, match=r"data.name='mnist' is not one of \['cifar10'"):
        load_splits(DataConfig(name="mnist"), seed=0)


# ---- embedded sources and splits --------------------------------------------------------------------


def test_digits_splits_test_fixed_val_seeded():
    a = load_splits(DataConfig(), seed=0)
    b = load_splits(DataConfig(), seed=0)
    c = load_splits(DataConfig(), seed=1)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape[1:] == (3, 32, 32)
    assert a.num_classes == 10 and sorted(set(a.train_y.tolist())) == list(range(10))
    assert len(a.train_y) + len(a.val_y) + len(a.test_y) == 1797
    assert len(a.test_y) == round(0.2 * 1797)
    assert torch.equal(a.test_x, c.test_x) and torch.equal(a.test_y, c.test_y)  # one test set
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)
    assert torch.equal(a.train_x[:, 0], a.train_x[:, 2])  # grey, replicated to RGB
    limited = load_splits(DataConfig(limit=100), seed=0)
    assert len(limited.train_y) == 100 and torch.equal(limited.val_y, a.val_y)  # limit after split


def test_splits_never_leak_between_train_val_and_test():
    s = load_splits(DataConfig(name="synthetic", synthetic_size=300), seed=3)
    rows = [set(map(bytes, x.flatten(1).numpy())) for x in (s.train_x, s.val_x, s.test_x)]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert sum(len(r) for r in rows) == 300


def test_synthetic_is_deterministic_and_sized():
    cfg = DataConfig(name="synthetic", synthetic_size=200, synthetic_classes=4, resolution=24)
    a, b = load_splits(cfg, seed=0), load_splits(cfg, seed=0)
    assert a.num_classes == 4 and a.train_x.shape[1:] == (3, 24, 24)
    assert torch.equal(a.train_x, b.train_x)
    assert len(a.train_y) + len(a.val_y) + len(a.test_y) == 200
    assert torch.bincount(torch.cat([a.train_y, a.val_y, a.test_y])).tolist() == [50] * 4


def test_synthetic_class_is_recoverable_from_the_pixels():
    """Learnable: the dominant spatial frequency's angle alone predicts the class far above chance."""
    k = 6
    s = load_splits(DataConfig(name="synthetic", synthetic_size=300, synthetic_classes=k), seed=0)
    grey = s.train_x.float().mean(1)
    grey -= grey.mean((1, 2), keepdim=True)
    power = torch.fft.fft2(grey).abs().flatten(1)
    freq = torch.fft.fftfreq(grey.shape[-1]) * grey.shape[-1]
    fy, fx = (f.flatten() for f in torch.meshgrid(freq, freq, indexing="ij"))
    peak = power.argmax(1)
    angle = torch.atan2(fy[peak], fx[peak]) % math.pi
    predicted = torch.round(angle / (math.pi / k)).long() % k
    assert (predicted == s.train_y).float().mean() > 0.7  # chance: 1/6


def test_pixel_statistics_are_the_training_splits():
    s = load_splits(DataConfig(limit=300), seed=0)
    pixels = s.train_x.permute(0, 2, 3, 1).reshape(-1, 3).double() / 255
    assert torch.allclose(s.mean.double(), pixels.mean(0), atol=1e-6)
    assert torch.allclose(s.std.double(), pixels.std(0), rtol=1e-3)
    cov = torch.cov(pixels.T).float()
    assert torch.allclose(s.eigvec @ torch.diag(s.eigval) @ s.eigvec.T, cov, atol=1e-4)
    assert torch.allclose(s.eigvec.T @ s.eigvec, torch.eye(3), atol=1e-5)
    assert s.eigval[0] >= s.eigval[1] >= s.eigval[2] >= 0


# ---- device batches and augmentation ----------------------------------------------------------------


def _batches(cfg, seed, **kw):
    data = DeviceData(load_splits(cfg, seed=0), cfg, **kw)
    return list(data.train_batches(torch.Generator().manual_seed(seed))), data


def test_unaugmented_batches_are_the_normalised_data_in_permuted_order():
    cfg = DataConfig(crop_padding=0, flip=False, color_shift=0.0, limit=200, batch_size=50)
    batches, data = _batches(cfg, 0)
    s = load_splits(cfg, seed=0)
    assert len(batches) == data.steps_per_epoch == 4 and data.num_train == 200
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (200, 3, 32, 32)
    expected = (s.train_x.float() / 255 - s.mean.view(1, 3, 1, 1)) / s.std.view(1, 3, 1, 1)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, expected[order], atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in batches]), s.train_y[order])
    # Normalised with training statistics: ~zero mean and unit std per channel.
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-2)


def test_a_last_batch_of_one_is_dropped_and_counted_so():
    cfg = DataConfig(limit=101, batch_size=50)
    batches, data = _batches(cfg, 0)
    assert [len(y) for _, y in batches] == [50, 50] and data.steps_per_epoch == 2
    batches, data = _batches(DataConfig(limit=103, batch_size=50), 0)
    assert [len(y) for _, y in batches] == [50, 50, 3] and data.steps_per_epoch == 3


def test_augmentation_is_seeded_and_each_part_does_its_job():
    base = dict(limit=64, batch_size=64)
    plain, _ = _batches(DataConfig(crop_padding=0, flip=False, color_shift=0.0, **base), 0)
    x0 = plain[0][0]
    a1, _ = _batches(DataConfig(crop_padding=4, flip=True, color_shift=0.1, **base), 0)
    a2, _ = _batches(DataConfig(crop_padding=4, flip=True, color_shift=0.1, **base), 0)
    a3, _ = _batches(DataConfig(crop_padding=4, flip=True, color_shift=0.1, **base), 1)
    assert torch.equal(a1[0][0], a2[0][0]) and torch.equal(a1[0][1], a2[0][1])
    assert not torch.equal(a1[0][0], a3[0][0]) and not torch.equal(a1[0][1], a3[0][1])
    assert torch.equal(a1[0][1], plain[0][1])  # the order is drawn first: augmenting keeps it

    flipped, _ = _batches(DataConfig(crop_padding=0, flip=True, color_shift=0.0, **base), 0)
    xf = flipped[0][0]
    same = [torch.equal(xf[i], x0[i]) for i in range(64)]
    mirrored = [torch.equal(xf[i], x0[i].flip(2)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54

    cropped, data = _batches(DataConfig(crop_padding=4, flip=False, color_shift=0.0, **base), 0)
    xc = cropped[0][0]
    # Reference, one sample at a time: zero-pad the 0..1 image by 4, cut 32x32 at the drawn offset.
    g = torch.Generator().manual_seed(0)
    torch.randperm(64, generator=g)  # train_batches draws the order, then row and column offsets
    oy, ox = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 9, (64,), generator=g)
    mean, std = data._mean, data._std
    padded = F.pad(x0 * std + mean, (4, 4, 4, 4))
    expected = torch.stack([padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32] for i in range(64)])
    assert torch.allclose(xc, (expected - mean) / std, atol=1e-5)
    moved = (oy != 4) | (ox != 4)
    assert moved.sum() > 48 and all(not torch.equal(xc[i], x0[i]) for i in range(64) if moved[i])

    lit, _ = _batches(DataConfig(crop_padding=0, flip=False, color_shift=0.5, **base), 0)
    delta = (lit[0][0] - x0).flatten(2)  # PCA lighting adds one constant per channel and image
    assert torch.allclose(delta.std(dim=2), torch.zeros(64, 3), atol=1e-5)
    offsets = delta.mean(dim=2)
    assert offsets.abs().max() > 1e-3 and offsets.std(0).min() > 1e-4  # varies between images


def test_lighting_noise_follows_the_principal_components_on_the_0_1_scale():
    cfg = DataConfig(name="synthetic", synthetic_size=200, crop_padding=0, flip=False,
                     color_shift=1.0, limit=64, batch_size=64)
    s = load_splits(cfg, seed=0)
    plain = DeviceData(s, dataclasses.replace(cfg, color_shift=0.0))
    lit = DeviceData(s, cfg)
    x0, _ = next(plain.train_batches(torch.Generator().manual_seed(5)))
    x1, _ = next(lit.train_batches(torch.Generator().manual_seed(5)))
    shift01 = ((x1 - x0) * s.std.view(1, 3, 1, 1)).mean((2, 3))  # undo normalisation: 0..1 scale
    g = torch.Generator().manual_seed(5)
    torch.randperm(64, generator=g)  # the draws in train_batches' order: permutation, then alphas
    alpha = torch.randn(64, 3, generator=g)
    expected = (alpha * s.eigval) @ s.eigvec.T
    assert torch.allclose(shift01, expected, atol=1e-5)


def _old_per_step_batches(data, generator):
    """The batch-by-batch path this module had before the epoch's draws were made up front: each step
    drew its own offsets, flips and lighting from the generator and copied them to the device. Kept
    verbatim (less the device moves, which are no-ops on CPU) as the reference for the new path."""
    n, bs = data.num_train, data.cfg.batch_size
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, bs):
        idx = perm[start:start + bs]
        if len(idx) < 2:
            break
        x = data._x["train"][idx].float().div_(255.0)
        m, c, h, w = x.shape
        p = data.cfg.crop_padding
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (m,), generator=generator)
            ox = torch.randint(0, 2 * p + 1, (m,), generator=generator)
            rows = oy[:, None] + torch.arange(h)
            cols = ox[:, None] + torch.arange(w)
            x = padded.gather(2, rows[:, None, :, None].expand(m, c, h, w + 2 * p))
            x = x.gather(3, cols[:, None, None, :].expand(m, c, h, w))
        if data.flip:
            mirror = torch.rand(m, generator=generator) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        if data.cfg.color_shift > 0:
            alpha = torch.randn(m, 3, generator=generator).mul_(data.cfg.color_shift)
            x = x.add_(((alpha * data._eigval) @ data._eigvec_t)[:, :, None, None])
        yield data._finish(x), data._y["train"][idx]


@pytest.mark.parametrize("limit,flip,crop,shift", [(203, True, 4, 0.1),  # last batch of 3
                                                   (201, True, 2, 0.5),  # last batch of 1: dropped
                                                   (150, False, 0, 0.1), (150, True, 4, 0.0)])
def test_epoch_draws_give_the_old_per_step_batches_bit_for_bit(limit, flip, crop, shift):
    """Same seed, same batches as the old per-step draw, over two epochs (the generator carries over,
    as it does in fit and across a checkpoint), and the generator ends in the same state."""
    cfg = DataConfig(name="synthetic", synthetic_size=300, limit=limit, batch_size=50, flip=flip,
                     crop_padding=crop, color_shift=shift)
    data = DeviceData(load_splits(cfg, seed=0), cfg)
    g_new, g_old = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):
        new = list(data.train_batches(g_new))
        old = list(_old_per_step_batches(data, g_old))
        assert [len(y) for _, y in new] == [len(y) for _, y in old] and len(new) == data.steps_per_epoch
        for (xn, yn), (xo, yo) in zip(new, old):
            assert torch.equal(yn, yo)
            assert torch.equal(xn, xo)  # bit for bit, not merely close
        assert torch.equal(g_new.get_state(), g_old.get_state())


def test_the_whole_epoch_is_drawn_before_the_first_step():
    """No step draws from the generator (on CUDA a draw per step is a copy per step): after the first
    batch the generator already stands where the whole epoch leaves it."""
    cfg = DataConfig(limit=200, batch_size=32, flip=True)
    data = DeviceData(load_splits(cfg, seed=0), cfg)
    g_first, g_all = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    next(data.train_batches(g_first))
    list(data.train_batches(g_all))
    assert torch.equal(g_first.get_state(), g_all.get_state())


def test_packed_copy_moves_mixed_dtypes_bit_for_bit():
    from sweeper.data.device import packed_copy

    g = torch.Generator().manual_seed(0)
    tensors = {"mirror": torch.rand(7, generator=g) < 0.5, "perm": torch.randperm(7, generator=g),
               "alpha": torch.randn(7, 3, generator=g), "oy": torch.randint(0, 9, (7,), generator=g),
               "empty": torch.zeros(0, dtype=torch.int64)}
    moved = packed_copy(tensors, torch.device("cpu"), pin=False)
    assert moved.keys() == tensors.keys()
    for k, t in tensors.items():
        assert moved[k].dtype == t.dtype and moved[k].shape == t.shape and torch.equal(moved[k], t), k


def test_eval_batches_are_in_order_and_unaugmented():
    cfg = DataConfig(limit=64, batch_size=32)
    s = load_splits(cfg, seed=0)
    data = DeviceData(s, cfg)
    for split in ("val", "test", "train"):
        xs, ys = zip(*data.eval_batches(split, batch_size=100))
        expected = (getattr(s, f"{split}_x").float() / 255 - s.mean.view(1, 3, 1, 1)) / s.std.view(
            1, 3, 1, 1)
        assert torch.allclose(torch.cat(xs), expected, atol=1e-5)
        assert torch.equal(torch.cat(ys), getattr(s, f"{split}_y"))
        assert all(len(y) <= 100 for y in ys)
    with pytest.raises(ValueError, match=r"split='validation' is not one of \['train', 'val', 'test'\]"):
        next(data.eval_batches("validation"))


def test_probe_batch_is_fixed_and_unaugmented():
    cfg = DataConfig(limit=64)
    data = DeviceData(load_splits(cfg, seed=0), cfg)
    x1, y1 = data.probe_batch(16)
    x2, y2 = data.probe_batch(16)
    assert x1.shape == (16, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    val_x, val_y = next(data.eval_batches("val"))
    assert torch.equal(x1, val_x[:16]) and torch.equal(y1, val_y[:16])
    assert data.num_classes == 10


def test_channels_last_batches():
    cfg = DataConfig(limit=16, batch_size=8)
    data = DeviceData(load_splits(cfg, seed=0), cfg, channels_last=True)
    x, _ = next(data.train_batches(torch.Generator().manual_seed(0)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert data.probe_batch(4)[0].is_contiguous(memory_format=torch.channels_last)
    assert next(data.eval_batches())[0].is_contiguous(memory_format=torch.channels_last)


def test_dataset_flip_defaults():
    assert DeviceData(load_splits(DataConfig(limit=8), seed=0), DataConfig()).flip is False
    assert DATASETS["cifar10"].flip and DATASETS["imagefolder"].flip and not DATASETS["synthetic"].flip


# ---- the decode cache -------------------------------------------------------------------------------


def _count_decodes(monkeypatch, name):
    calls = []
    spec = DATASETS[name]

    def counting(*args):
        calls.append(1)
        time.sleep(0.2)  # hold the lock long enough that the other threads really wait on it
        return spec.decode(*args)

    monkeypatch.setitem(DATASETS, name, spec.__class__(**{**spec.__dict__, "decode": counting}))
    monkeypatch.setattr(splits_module, "DATASETS", DATASETS)
    return calls


def test_decode_happens_once_per_cache_even_under_concurrency(monkeypatch):
    calls = _count_decodes(monkeypatch, "synthetic")
    cfg = DataConfig(name="synthetic", synthetic_size=123)
    results, errors = [], []

    def load():
        try:
            results.append(load_splits(cfg, seed=0))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and len(calls) == 1
    assert all(torch.equal(r.train_x, results[0].train_x) for r in results)
    load_splits(cfg, seed=1)  # another seed splits the same decoded file
    assert len(calls) == 1
    files = list((cache_root() / "decoded").iterdir())
    assert not [f for f in files if f.name.endswith(".tmp")]  # written atomically, nothing left over
    assert "synthetic" in next(f for f in files if f.suffix == ".key").read_text()


def test_cache_key_separates_resolutions_and_synthetic_settings(monkeypatch):
    calls = _count_decodes(monkeypatch, "synthetic")
    load_splits(DataConfig(name="synthetic", synthetic_size=40), seed=0)
    load_splits(DataConfig(name="synthetic", synthetic_size=40, resolution=16), seed=0)
    load_splits(DataConfig(name="synthetic", synthetic_size=41), seed=0)
    load_splits(DataConfig(name="synthetic", synthetic_size=40, synthetic_classes=3), seed=0)
    assert len(calls) == 4
    load_splits(DataConfig(name="synthetic", synthetic_size=40, resolution=16), seed=7)
    assert len(calls) == 4


def test_an_unreadable_cache_file_is_rebuilt():
    built = []

    def build():
        built.append(1)
        return {"x": torch.arange(3)}

    assert torch.equal(cached("k", build)["x"], torch.arange(3))
    (path,) = [p for p in (cache_root() / "decoded").iterdir() if p.suffix == ".pt"]
    path.write_bytes(b"truncated")
    assert torch.equal(cached("k", build)["x"], torch.arange(3)) and len(built) == 2
    assert torch.equal(cached("k", build)["x"], torch.arange(3)) and len(built) == 2
    assert os.path.getsize(path) > len(b"truncated")


def test_a_reused_worker_computes_a_splits_pixel_statistics_once(monkeypatch):
    """Trial after trial on one Ray worker loads the same split: its statistics (most of a warm load's
    time) are computed once per process and seed, and handed out as copies."""
    import sweeper.data.splits as splits_module

    calls = []
    real = splits_module.pixel_statistics
    monkeypatch.setattr(splits_module, "pixel_statistics", lambda x: calls.append(len(x)) or real(x))
    monkeypatch.setattr(splits_module, "_STATS", {})
    cfg = DataConfig(name="synthetic", synthetic_size=200)
    first = load_splits(cfg, seed=3)
    first.mean.zero_()  # a trial that changed its copy changes nobody else's
    again = load_splits(cfg, seed=3)
    other = load_splits(cfg, seed=4)
    assert len(calls) == 2  # seeds 3 and 4; the second seed-3 load reused its statistics
    assert torch.equal(again.std, first.std) and again.mean.abs().sum() > 0
    assert not torch.equal(other.mean, again.mean)  # another seed: another training split


def test_decoded_bytes_is_the_nodes_decoded_copy_and_none_before_it(tmp_path, monkeypatch):
    """What resources='auto' adds to a measured step: the splits a trial holds on its GPU."""
    from sweeper.data.splits import decoded_bytes

    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path))
    cfg = DataConfig(name="synthetic", synthetic_size=300)
    assert decoded_bytes(cfg) is None
    splits = load_splits(cfg, seed=0)
    images = sum(t.numel() for t in (splits.train_x, splits.val_x, splits.test_x))
    assert images <= decoded_bytes(cfg) < 1.2 * images + 100_000
    assert decoded_bytes(dataclasses.replace(cfg, synthetic_size=301)) is None  # another dataset


def test_imagefolder_with_one_class_is_refused(tmp_path):
    """One class folder: every loss is 0 and every accuracy 1, a result that means nothing."""
    for i in range(4):
        _png(tmp_path / "train" / "cat" / f"{i}.png", (255, 0, 0))
    with pytest.raises(DatasetUnavailable, match=r"train/ has 1 class folder\(s\) \['cat'\]; a "
                                                  "classifier needs at least 2"):
        load_splits(DataConfig(name="imagefolder", dir=str(tmp_path), resolution=16), seed=0)
