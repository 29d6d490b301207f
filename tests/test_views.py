"""VGG's multi-scale training and multi-crop test (data.crop, data.scale_min/max, data.test_*), on
small images written in the datasets' real on-disk layouts: STL-10's binaries, Food-101's meta split
and image folders, an ImageFolder tree."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from PIL import Image
from torch import nn

from sweeper.config import ConfigError, DataConfig, TrialConfig
from sweeper.data import DeviceData, load_splits
from sweeper.data.device import DataTooLarge
from sweeper.data.views import grid_offsets, multicrop_evaluate, view_batches, views_per_image
from sweeper.train import fit

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path / "cache"))


# ---- real on-disk layouts ---------------------------------------------------------------------------


def _stl10(root, monkeypatch, n_train=8, n_test=3):
    """STL-10's binary release: column-major 96x96 images, 1-based labels, all five files."""
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    files = {"train_X.bin": RNG.integers(0, 256, (n_train, 3, 96, 96), dtype=np.uint8),
             "train_y.bin": (np.arange(n_train) % 10 + 1).astype(np.uint8),
             "unlabeled_X.bin": RNG.integers(0, 256, 3 * 96 * 96, dtype=np.uint8),
             "test_X.bin": RNG.integers(0, 256, (n_test, 3, 96, 96), dtype=np.uint8),
             "test_y.bin": (np.arange(n_test) % 10 + 1).astype(np.uint8)}
    for name, array in files.items():
        array.tofile(base / name)

    def md5(name):
        return hashlib.md5((base / name).read_bytes()).hexdigest()

    monkeypatch.setattr(tvd.STL10, "train_list", [[n, md5(n)] for n in
                                                  ("train_X.bin", "train_y.bin", "unlabeled_X.bin")])
    monkeypatch.setattr(tvd.STL10, "test_list", [[n, md5(n)] for n in ("test_X.bin", "test_y.bin")])
    return root


def _food101(root, per_class=(3, 2), size=(80, 60)):
    """food-101/meta/{train,test}.{json,txt}, classes.txt and images/<class>/<id>.jpg (512 px in the
    release; smaller here)."""
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    classes = ["apple_pie", "ramen", "sushi"]
    (base / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    n = 0
    for split, k in zip(("train", "test"), per_class):
        meta = {}
        for c, cls in enumerate(classes):
            meta[cls] = []
            for _ in range(k):
                rel = f"{cls}/{1000 + n}"
                n += 1
                path = base / "images" / f"{rel}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                pixels[..., c] = 255  # a class colour under the noise
                Image.fromarray(pixels).save(path, quality=95)
                meta[cls].append(rel)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        (base / "meta" / f"{split}.txt").write_text("\n".join(r for v in meta.values() for r in v) + "\n")
    return root


def _imagefolder(root, n_train=4, n_test=2, size=(64, 48)):
    for split, n in (("train", n_train), ("test", n_test)):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):
                path = root / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                pixels[..., 2 * c] = 255
                Image.fromarray(pixels).save(path)
    return root


def _data(cfg: DataConfig) -> DeviceData:
    return DeviceData(load_splits(cfg, seed=0), cfg)


# ---- the number and the content of the test views ---------------------------------------------------


def test_stl10_vgg_protocol_gives_150_views_per_image(tmp_path, monkeypatch):
    """3 scales x 2 flips x 5 x 5 crops = 150 views per test image, each crop x crop."""
    root = _stl10(tmp_path / "stl", monkeypatch)
    cfg = DataConfig(name="stl10", dir=str(root), crop=64, scale_min=72, scale_max=96,
                     test_scales="64,80,96", test_grid=5, test_flips=True)
    data = _data(cfg)
    assert views_per_image(cfg) == 150
    batches = list(view_batches(data, "test"))
    assert sum(len(v) for v, _, _ in batches) == 3 * 150 == data.num_examples("test") * 150
    assert all(v.shape[1:] == (3, 64, 64) for v, _, _ in batches)
    assert sum(b for _, _, b in batches) == 3 * 3  # each image once per scale


@pytest.mark.parametrize("scales,grid,flips", [("40,48", 2, True), ("44", 3, False), ("40", 1, True)])
def test_food101_views_per_image_is_scales_times_flips_times_grid_squared(tmp_path, scales, grid, flips):
    root = _food101(tmp_path / "food")
    cfg = DataConfig(name="food101", dir=str(root), resolution=48, crop=40, test_scales=scales,
                     test_grid=grid, test_flips=flips, val_fraction=0.34)
    data = _data(cfg)
    expected = len(scales.split(",")) * (2 if flips else 1) * grid * grid
    assert views_per_image(cfg) == expected
    n = sum(len(v) for v, _, _ in view_batches(data, "test", batch_size=8))  # several chunks
    assert n == data.num_examples("test") * expected == 6 * expected


def test_views_are_the_grid_crops_and_their_mirrors_at_each_scale(tmp_path):
    root = _imagefolder(tmp_path / "tree")
    cfg = DataConfig(name="imagefolder", dir=str(root), resolution=48, crop=32, test_scales="32,48",
                     test_grid=3, test_flips=True)
    data = _data(cfg)
    x_all, _ = data.images("test")
    # Per chunk of images, one yield per scale in data.test_scales' order: 32, then 48 (stored side).
    v, _, b = list(view_batches(data, "test"))[1]
    v = v.view(b, 18, 3, 32, 32)
    img = data.normalise(x_all[:b].float() / 255)
    assert grid_offsets(48, 32, 3).tolist() == [0, 8, 16]
    for gy, oy in enumerate([0, 8, 16]):
        for gx, ox in enumerate([0, 8, 16]):
            crop = img[:, :, oy:oy + 32, ox:ox + 32]
            k = (gy * 3 + gx) * 2
            assert torch.allclose(v[:, k], crop, atol=1e-5)
            assert torch.allclose(v[:, k + 1], crop.flip(-1), atol=1e-5)
    # Scale 32 = crop: every grid position is the whole image resized to 32 (antialiased).
    v32, _, _ = next(iter(view_batches(data, "test")))
    v32 = v32.view(b, 18, 3, 32, 32)
    small = F.interpolate(x_all[:b].float() / 255, size=(32, 32), mode="bilinear",
                          align_corners=False, antialias=True)
    assert torch.allclose(v32[:, 0], data.normalise(small), atol=1e-5)
    assert torch.allclose(v32[:, 0], v32[:, 16], atol=1e-6)


class _Pixels(nn.Module):
    """A fixed 'network' whose logits are linear in the input: cheap, and different views differ."""

    def __init__(self, classes=2):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(3, classes, 5, padding=2)

    def forward(self, x):
        return self.proj(x).amax(dim=(2, 3)) * 3.0


def test_multicrop_metrics_come_from_the_views_averaged_softmax(tmp_path):
    """Reference: one forward per view per image, soft-max, mean over the views, then top-1/NLL."""
    root = _imagefolder(tmp_path / "tree")
    cfg = DataConfig(name="imagefolder", dir=str(root), resolution=48, crop=32, test_scales="32,40,48",
                     test_grid=2, test_flips=True)
    data = _data(cfg)
    model = _Pixels()
    got = multicrop_evaluate(model, data, "test", batch_size=8)
    x_all, y_all = data.images("test")
    probs = []
    with torch.no_grad():
        for i in range(len(y_all)):
            img = x_all[i:i + 1].float() / 255
            views = []
            for q in (32, 40, 48):
                r = F.interpolate(img, size=(q, q), mode="bilinear", align_corners=False,
                                  antialias=q < 48) if q != 48 else img
                for oy in grid_offsets(q, 32, 2).tolist():
                    for ox in grid_offsets(q, 32, 2).tolist():
                        c = r[:, :, oy:oy + 32, ox:ox + 32]
                        views += [c, c.flip(-1)]
            assert len(views) == 24  # 3 scales x 2 x 2 crops x 2 flips
            p = torch.stack([model(data.normalise(v.clone())).softmax(1)[0] for v in views])
            probs.append(p.mean(0))
    probs = torch.stack(probs)
    top1 = (probs.argmax(1) == y_all).float().mean().item()
    nll = -probs[torch.arange(len(y_all)), y_all].log().mean().item()
    assert got["views"] == 24
    assert got["top1_error"] == pytest.approx(1 - top1) and got["accuracy"] == pytest.approx(top1)
    assert got["loss"] == pytest.approx(nll, rel=1e-5)
    assert got["top5_error"] == 0.0  # 2 classes: the true one is always in the top 5
    assert model.training  # put back in the mode it came in


def _spy_reads(monkeypatch) -> list[str]:
    """Records every host read of a tensor value; fails on a tensor made from host data."""
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda *a, _o=original, _n=name, **k: (reads.append(_n), _o(*a, **k))[1])
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("torch.tensor from host data"))
    return reads


def test_multicrop_evaluation_and_jittered_epochs_read_once_not_per_step(tmp_path, monkeypatch):
    """Views are summed on the device and read once at the end; a jittered epoch reads its S draws
    once, from the CPU generator, before its first step (CUDA: tests at the end of this file)."""
    root = _imagefolder(tmp_path / "tree", n_test=6)
    cfg = DataConfig(name="imagefolder", dir=str(root), resolution=48, crop=32, scale_min=32,
                     scale_max=48, test_scales="40,48", test_grid=2, batch_size=2)
    data = _data(cfg)
    reads = _spy_reads(monkeypatch)
    multicrop_evaluate(_Pixels(), data, "test", batch_size=8)  # 8 views per forward: 6 steps
    assert reads == ["tolist"]
    reads.clear()
    assert len(list(data.train_batches(torch.Generator().manual_seed(0)))) == data.steps_per_epoch == 3
    assert reads == ["tolist"]


# ---- scale jitter -----------------------------------------------------------------------------------


def test_scale_jitter_draws_s_in_range_and_crops_of_the_stated_size(tmp_path):
    root = _food101(tmp_path / "food", per_class=(12, 1))
    cfg = DataConfig(name="food101", dir=str(root), resolution=48, crop=32, scale_min=34,
                     scale_max=48, crop_padding=0, color_shift=0.0, flip=False, batch_size=4,
                     val_fraction=0.1)
    data = _data(cfg)
    seen = set()
    for seed in range(6):
        draws = data.draw_epoch(torch.Generator().manual_seed(seed))
        assert len(draws.scales) == len(draws.bounds) == data.steps_per_epoch
        assert all(34 <= s <= 48 for s in draws.scales)
        for b, (start, stop) in enumerate(draws.bounds):  # each crop fits inside its S x S image
            assert 0 <= draws.oy[start:stop].min() and draws.oy[start:stop].max() <= draws.scales[b] - 32
            assert draws.ox[start:stop].max() <= draws.scales[b] - 32
        seen.update(draws.scales)
        for x, y in data.train_batches(torch.Generator().manual_seed(seed)):
            assert x.shape[1:] == (3, 32, 32) and len(x) == len(y)
    assert len(seen) > 5  # S really varies

    # The batch is the stored image resized to S, cut at the drawn offset (nothing else on).
    g = torch.Generator().manual_seed(3)
    draws = data.draw_epoch(g)
    x, _ = next(data.train_batches(torch.Generator().manual_seed(3)))
    start, stop = draws.bounds[0]
    s = draws.scales[0]
    raw = data.images("train")[0][draws.perm[start:stop]].float() / 255
    resized = F.interpolate(raw, size=(s, s), mode="bilinear", align_corners=False,
                            antialias=s < 48) if s != 48 else raw
    ref = torch.stack([resized[i, :, oy:oy + 32, ox:ox + 32] for i, (oy, ox) in
                       enumerate(zip(draws.oy[start:stop].tolist(), draws.ox[start:stop].tolist()))])
    assert torch.allclose(x, data.normalise(ref), atol=1e-5)


def test_scale_jitter_is_seeded_and_drawn_before_the_first_step(tmp_path, monkeypatch):
    root = _stl10(tmp_path / "stl", monkeypatch, n_train=20)
    cfg = DataConfig(name="stl10", dir=str(root), crop=64, scale_min=64, scale_max=96, batch_size=4,
                     val_fraction=0.2)
    data = _data(cfg)
    a = list(data.train_batches(torch.Generator().manual_seed(1)))
    b = list(data.train_batches(torch.Generator().manual_seed(1)))
    c = list(data.train_batches(torch.Generator().manual_seed(2)))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    g_first, g_all = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    next(data.train_batches(g_first))
    list(data.train_batches(g_all))
    assert torch.equal(g_first.get_state(), g_all.get_state())


def test_crop_without_jitter_trains_on_shifted_crops_and_evaluates_the_centre(tmp_path):
    root = _imagefolder(tmp_path / "tree")
    cfg = DataConfig(name="imagefolder", dir=str(root), resolution=40, crop=32, crop_padding=0,
                     flip=False, color_shift=0.0, batch_size=4)
    data = _data(cfg)
    draws = data.draw_epoch(torch.Generator().manual_seed(0))
    assert draws.scales is None and int(draws.oy.max()) <= 8 and data.eval_scale == 40
    x, _ = next(data.eval_batches("test"))
    raw = data.images("test")[0].float() / 255
    assert torch.allclose(x, data.normalise(raw[:, :, 4:36, 4:36]), atol=1e-6)
    assert data.probe_batch(2)[0].shape[1:] == (3, 32, 32)
    # With jitter the single-crop scale is the middle of [scale_min, scale_max], as in VGG.
    jit = _data(DataConfig(name="imagefolder", dir=str(root), resolution=40, crop=32, scale_min=33,
                           scale_max=40))
    assert jit.eval_scale == 36 and next(jit.eval_batches("val"))[0].shape[1:] == (3, 32, 32)


# ---- the trial and its settings ---------------------------------------------------------------------


def test_fit_reports_single_and_multicrop_test_metrics(tmp_path):
    root = _imagefolder(tmp_path / "tree", n_train=6, n_test=3)
    cfg = TrialConfig.from_flat({
        "data.name": "imagefolder", "data.dir": str(root), "data.resolution": 40, "data.crop": 32,
        "data.scale_min": 32, "data.scale_max": 40, "data.test_scales": "32,40", "data.test_grid": 2,
        "data.batch_size": 4, "model.arch": "smallcnn", "model.width": 0.125, "epochs": 2,
        "device": "cpu", "diagnostics.enabled": False, "optim.schedule": "constant"})
    reports = []
    result = fit(cfg, report=lambda m, save: reports.append(m))
    last = result.last
    assert last["test_views"] == 2 * 2 * 2 * 2 and last["test_examples"] == 6
    for k in ("loss", "accuracy", "top1_error", "top5_error"):
        assert math.isfinite(last[f"test_multicrop_{k}"]) and math.isfinite(last[f"test_{k}"])
    assert 0 <= last["test_multicrop_top1_error"] <= 1 and last["test_multicrop_top5_error"] == 0.0
    assert "test_views" not in reports[0] and reports[-1]["test_views"] == 16  # the last epoch only


_C24 = {"data.crop": 24}  # on digits, stored at 32
_BAD = [  # (settings, a phrase the message must hold)
    ({"data.crop": 40}, "data.crop=40 must be <= the stored resolution 32"),
    ({"data.crop": 4}, "data.crop=4 must be >= 8"),
    ({**_C24, "data.scale_min": 28}, "data.scale_min=28 and data.scale_max=None: set both"),
    ({"data.scale_min": 28, "data.scale_max": 30}, "need data.crop"),
    ({**_C24, "data.scale_min": 20, "data.scale_max": 30}, "data.scale_min=20 must be >= data.crop=24"),
    ({**_C24, "data.scale_min": 30, "data.scale_max": 28}, "data.scale_min=30 must be <= data.scale_max=28"),
    ({**_C24, "data.scale_min": 24, "data.scale_max": 64},
     "data.scale_max=64 must be <= the stored resolution 32"),
    ({**_C24, "data.test_scales": "24,x"}, "data.test_scales='24,x' is not a comma-separated list"),
    ({**_C24, "data.test_scales": ","}, "data.test_scales=',' lists no scale"),
    ({**_C24, "data.test_scales": "24,24"}, "repeats a scale"),
    ({**_C24, "data.test_scales": "16,32"}, "scale 16 must be >= data.crop=24"),
    ({**_C24, "data.test_scales": "24,48"}, "scale 48 must be <= the stored resolution 32"),
    ({"data.test_scales": "32"}, "data.test_scales='32' needs data.crop"),
    ({"data.test_grid": 0}, "data.test_grid=0 must be >= 1"),
    ({"data.name": "food101", "data.resolution": 128, "data.crop": 160},
     "data.crop=160 must be <= the stored resolution 128"),
]


@pytest.mark.parametrize("flat,needle", _BAD)
def test_bad_view_settings_name_the_field_the_value_and_the_rule(flat, needle):
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat(flat)
    assert needle in str(err.value)


def test_view_settings_default_off_and_round_trip():
    cfg = TrialConfig.from_flat({})
    assert (cfg.data.crop, cfg.data.scale_min, cfg.data.test_scales) == (None, None, None)
    flat = {"data.name": "stl10", "data.crop": 64, "data.scale_min": 72, "data.scale_max": 96,
            "data.test_scales": "64, 80,96", "data.test_grid": "3", "data.test_flips": "false"}
    cfg = TrialConfig.from_flat(flat)
    assert cfg.data.test_scale_list == (64, 80, 96) and views_per_image(cfg.data) == 27
    assert TrialConfig.from_flat(cfg.to_flat()) == cfg


def test_data_too_large_for_the_device_stops_with_the_memory_it_needs(tmp_path, monkeypatch):
    """No CUDA needed: the check runs before anything moves to the device."""
    cfg = DataConfig(name="imagefolder", dir=str(_imagefolder(tmp_path / "tree")), resolution=48)
    splits = load_splits(cfg, seed=0)  # 12 images x 3 x 48 x 48 bytes + labels: 83 kB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100_000, 80_000_000_000))
    with pytest.raises(DataTooLarge, match=r"data.name='imagefolder' at data.resolution=48: the "
                                           r"splits take 0.00 GB .* Lower data.resolution"):
        DeviceData(splits, cfg, device="cuda")


# ---- on a CUDA device -------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_on_cuda_jittered_epochs_and_multicrop_views_never_synchronise(tmp_path):
    root = _imagefolder(tmp_path / "tree", n_train=20, n_test=5)
    cfg = DataConfig(name="imagefolder", dir=str(root), resolution=48, crop=32, scale_min=32,
                     scale_max=48, test_scales="32,40,48", test_grid=5, batch_size=8)
    splits = load_splits(cfg, seed=0)
    gpu, cpu = DeviceData(splits, cfg, device="cuda"), DeviceData(splits, cfg)
    model = _Pixels().cuda()
    original = torch.Tensor.tolist

    def final_read(t):  # multicrop_evaluate's one read, after the last view
        torch.cuda.set_sync_debug_mode("default")
        return original(t)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [(x.sum(), y.sum()) for x, y in gpu.train_batches(torch.Generator().manual_seed(0))]
        views = [v.sum() for v, _, _ in view_batches(gpu, "test", batch_size=64)]
        torch.Tensor.tolist = final_read
        got = multicrop_evaluate(model, gpu, "test")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.Tensor.tolist = original
    cpu_batches = list(cpu.train_batches(torch.Generator().manual_seed(0)))
    assert len(batches) == len(cpu_batches) and len(views) == gpu.num_examples("test") * 3
    for (xs, ys), (xc, yc) in zip(batches, cpu_batches):  # same draws on both devices
        assert int(ys) == int(yc.sum()) and abs(float(xs) - float(xc.sum())) < 1e-3 * xc.numel()
    ref = multicrop_evaluate(model.cpu(), cpu, "test")
    assert got["views"] == 150 and got["loss"] == pytest.approx(ref["loss"], rel=1e-3)


@cuda
def test_on_cuda_fit_with_jitter_and_multicrop_reports_both_tests(tmp_path):
    root = _imagefolder(tmp_path / "tree", n_train=40, n_test=5)
    cfg = TrialConfig.from_flat({
        "data.name": "imagefolder", "data.dir": str(root), "data.resolution": 48, "data.crop": 32,
        "data.scale_min": 32, "data.scale_max": 48, "data.test_scales": "32,40,48",
        "data.batch_size": 8, "model.arch": "vgg11", "model.batch_norm": True, "model.width": 0.25,
        "epochs": 2, "device": "cuda", "diagnostics.enabled": False})
    last = fit(cfg).last
    assert last["test_views"] == 150 and math.isfinite(last["test_multicrop_loss"])
    assert last["gpu_memory_peak_mb"] > 0
