"""Data: every source loads from files in its real on-disk format; splits, augmentation and the cache
behave as documented. Real datasets are never downloaded here: the tests write tiny ones."""

import hashlib
import json
import pickle
import threading

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from sweeper.config import DataConfig
from sweeper.data import DATASETS, DatasetUnavailable, DeviceData, load_splits

RNG = np.random.default_rng(0)


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


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
    base, names = _write_cifar10(tmp_path)
    # torchvision verifies each file's md5 against the real release; point it at ours instead.
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[n, _md5(base / n)] for n in names])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", _md5(base / "test_batch")]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": _md5(base / "batches.meta")})
    return tmp_path


def test_cifar10_pickles_load_through_torchvision(cifar10):
    s = load_splits(DataConfig(name="cifar10", dir=str(cifar10), val_fraction=0.2), seed=0)
    assert s.train_x.dtype == torch.uint8 and s.train_x.shape[1:] == (3, 32, 32)
    assert len(s.train_y) + len(s.val_y) == 30 and len(s.val_y) == 6
    assert s.test_y.tolist() == list(range(8))  # the official test split, kept apart, in order
    assert s.num_classes == 10 and s.classes[0] == "c0"


def test_cifar100_pickles_load_with_fine_labels(tmp_path, monkeypatch):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    _pickle(base / "train", {"data": RNG.integers(0, 256, (20, 3072), dtype=np.uint8),
                             "fine_labels": list(range(20)), "coarse_labels": [0] * 20})
    _pickle(base / "test", {"data": RNG.integers(0, 256, (5, 3072), dtype=np.uint8),
                            "fine_labels": [99, 98, 97, 96, 95], "coarse_labels": [1] * 5})
    _pickle(base / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", _md5(base / "train")]])
    monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", _md5(base / "test")]])
    monkeypatch.setattr(tvd.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names",
                                               "md5": _md5(base / "meta")})
    s = load_splits(DataConfig(name="cifar100", dir=str(tmp_path)), seed=0)
    assert s.num_classes == 100
    assert s.test_y.tolist() == [99, 98, 97, 96, 95]


def test_stl10_binaries_load_at_96_and_resize_on_request(tmp_path, monkeypatch):
    base = tmp_path / "stl10_binary"
    base.mkdir()
    files = {"train_X.bin": RNG.integers(0, 256, 12 * 3 * 96 * 96, dtype=np.uint8),
             "train_y.bin": np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2], dtype=np.uint8),
             "unlabeled_X.bin": RNG.integers(0, 256, 1 * 3 * 96 * 96, dtype=np.uint8),
             "test_X.bin": RNG.integers(0, 256, 4 * 3 * 96 * 96, dtype=np.uint8),
             "test_y.bin": np.array([10, 9, 8, 7], dtype=np.uint8)}
    for name, array in files.items():
        array.tofile(base / name)
    (base / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)))
    monkeypatch.setattr(tvd.STL10, "train_list", [[n, _md5(base / n)] for n in
                                                  ("train_X.bin", "train_y.bin", "unlabeled_X.bin")])
    monkeypatch.setattr(tvd.STL10, "test_list", [[n, _md5(base / n)] for n in
                                                 ("test_X.bin", "test_y.bin")])
    s = load_splits(DataConfig(name="stl10", dir=str(tmp_path)), seed=0)
    assert s.train_x.shape[1:] == (3, 96, 96)
    assert s.test_y.tolist() == [9, 8, 7, 6]  # 1-based on disk
    small = load_splits(DataConfig(name="stl10", dir=str(tmp_path), resolution=32), seed=0)
    assert small.train_x.shape[1:] == (3, 32, 32)


def _png(path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_with_train_and_test_folders(tmp_path):
    for split, n in (("train", 5), ("test", 2)):
        for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", colour)
    s = load_splits(DataConfig(name="imagefolder", dir=str(tmp_path), resolution=16,
                               val_fraction=0.2), seed=0)
    assert s.classes == ["cat", "dog"]
    assert s.train_x.shape[1:] == (3, 16, 16)
    assert len(s.test_y) == 4 and len(s.train_y) + len(s.val_y) == 10
    red = s.test_x[s.test_y == 0].float()
    assert red[:, 0].mean() > 250 and red[:, 2].mean() < 5  # colours survive the decode


def test_food101_meta_split_and_images(tmp_path):
    base = tmp_path / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "ramen": ["ramen/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "ramen": ["ramen/5"]}}
    for split, classes in meta.items():
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(classes))
        for rels in classes.values():
            for rel in rels:
                path = base / "images" / f"{rel}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (60, 80), (0, 200, 0)).save(path)
    s = load_splits(DataConfig(name="food101", dir=str(tmp_path), val_fraction=0.34), seed=0)
    assert s.train_x.shape[1:] == (3, 64, 64)  # Food-101's default decode size
    assert s.classes == ["apple_pie", "ramen"]
    assert sorted(s.test_y.tolist()) == [0, 1]


@pytest.mark.parametrize("name,looked_for", [("cifar10", "cifar-10-batches-py"),
                                             ("cifar100", "cifar-100-python"),
                                             ("stl10", "stl10_binary"), ("food101", "food-101")])
def test_absent_dataset_names_itself_the_directory_and_the_alternatives(tmp_path, name, looked_for):
    with pytest.raises(DatasetUnavailable) as info:
        load_splits(DataConfig(name=name, dir=str(tmp_path / "nowhere")), seed=0)
    text = str(info.value)
    assert repr(name) in text and str(tmp_path / "nowhere") in text and looked_for in text
    assert "--data-dir" in text and "data.download=true" in text and "data.name=digits" in text


def test_imagefolder_needs_a_directory():
    with pytest.raises(DatasetUnavailable, match="needs data.dir"):
        load_splits(DataConfig(name="imagefolder"), seed=0)


def test_digits_splits_test_fixed_val_seeded():
    a = load_splits(DataConfig(), seed=0)
    b = load_splits(DataConfig(), seed=0)
    c = load_splits(DataConfig(), seed=1)
    assert a.train_x.shape[1:] == (3, 32, 32) and a.num_classes == 10
    assert len(a.train_y) + len(a.val_y) + len(a.test_y) == 1797
    assert torch.equal(a.test_x, c.test_x)  # one test set for every trial
    assert torch.equal(a.val_x, b.val_x) and not torch.equal(a.val_x, c.val_x)
    assert len(load_splits(DataConfig(limit=100), seed=0).train_y) == 100


def test_synthetic_is_deterministic_and_sized():
    cfg = DataConfig(name="synthetic", synthetic_size=200, synthetic_classes=4, resolution=24)
    a, b = load_splits(cfg, seed=0), load_splits(cfg, seed=0)
    assert a.num_classes == 4 and a.train_x.shape[1:] == (3, 24, 24)
    assert torch.equal(a.train_x, b.train_x)
    assert len(a.train_y) + len(a.val_y) + len(a.test_y) == 200


def _batches(cfg, seed, **kw):
    data = DeviceData(load_splits(cfg, seed=0), cfg, **kw)
    return list(data.train_batches(torch.Generator().manual_seed(seed))), data


def test_unaugmented_batches_are_the_normalised_data_in_permuted_order():
    cfg = DataConfig(crop_padding=0, flip=False, color_shift=0.0, limit=200, batch_size=50)
    batches, data = _batches(cfg, 0)
    s = load_splits(cfg, seed=0)
    x = torch.cat([b[0] for b in batches])
    expected = (s.train_x.float() / 255 - s.mean.view(1, 3, 1, 1)) / s.std.view(1, 3, 1, 1)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, expected[order], atol=1e-6)
    assert torch.equal(torch.cat([b[1] for b in batches]), s.train_y[order])
    # Normalised with training statistics: ~zero mean and unit std per channel.
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-2)


def test_augmentation_is_seeded_and_each_part_does_its_job():
    base = dict(limit=64, batch_size=64)
    plain, _ = _batches(DataConfig(crop_padding=0, flip=False, color_shift=0.0, **base), 0)
    x0 = plain[0][0]
    a1, _ = _batches(DataConfig(crop_padding=4, flip=True, color_shift=0.1, **base), 0)
    a2, _ = _batches(DataConfig(crop_padding=4, flip=True, color_shift=0.1, **base), 0)
    a3, _ = _batches(DataConfig(crop_padding=4, flip=True, color_shift=0.1, **base), 1)
    assert torch.equal(a1[0][0], a2[0][0]) and not torch.equal(a1[0][0], a3[0][0])

    flipped, _ = _batches(DataConfig(crop_padding=0, flip=True, color_shift=0.0, **base), 0)
    xf = flipped[0][0]
    same = [torch.equal(xf[i], x0[i]) for i in range(64)]
    mirrored = [torch.equal(xf[i], x0[i].flip(2)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54

    cropped, _ = _batches(DataConfig(crop_padding=4, flip=False, color_shift=0.0, **base), 0)
    xc = cropped[0][0]
    shifted = sum(not torch.equal(xc[i], x0[i]) for i in range(64))
    assert shifted > 48  # 80 of 81 offsets move the image
    # A crop is a shift: some 24x24 window of the original reappears unchanged.
    i = next(i for i in range(64) if not torch.equal(xc[i], x0[i]))
    windows = x0[i].unfold(1, 24, 1).unfold(2, 24, 1)  # 3 x 9 x 9 x 24 x 24
    centre = xc[i][:, 4:28, 4:28]
    assert any(torch.allclose(windows[:, r, c], centre) for r in range(9) for c in range(9))

    lit, _ = _batches(DataConfig(crop_padding=0, flip=False, color_shift=0.5, **base), 0)
    delta = lit[0][0] - x0  # PCA lighting adds one constant per channel and image
    per_image = delta.flatten(2)
    assert torch.allclose(per_image.std(dim=2), torch.zeros(64, 3), atol=1e-5)
    assert per_image.mean(dim=2).abs().max() > 1e-3


def test_probe_batch_is_fixed_and_unaugmented():
    cfg = DataConfig(limit=64)
    data = DeviceData(load_splits(cfg, seed=0), cfg)
    x1, y1 = data.probe_batch(16)
    x2, y2 = data.probe_batch(16)
    assert x1.shape == (16, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    val_x, val_y = next(data.eval_batches("val"))
    assert torch.equal(x1, val_x[:16])


def test_decode_happens_once_per_cache_even_under_concurrency(monkeypatch):
    calls = []
    spec = DATASETS["synthetic"]
    original = spec.decode

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setitem(DATASETS, "synthetic", spec.__class__(**{**spec.__dict__, "decode": counting}))
    cfg = DataConfig(name="synthetic", synthetic_size=123)
    results, errors = [], []

    def load():
        try:
            results.append(load_splits(cfg, seed=0))
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert len(calls) == 1
    load_splits(cfg, seed=1)
    assert len(calls) == 1
