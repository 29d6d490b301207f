"""The per-layer profile: one small PNG per trial, layers in network order, log scales where the
quantity spans decades, and scalars that say at a glance where the signal went. No MLflow, no Ray."""

import math
import random
import struct

import pytest

from sweeper.profile import _figure, layer_keys, layer_profile, profile_summary

FAMILIES_AT_INIT = ("act_std", "act_std_pred", "grad_norm", "update_ratio", "dead_frac", "gain_pred",
                    "gain_meas")


def _reports(n_layers=8, shrink=10.0):
    """A first report (step 0 under init/) and a last one for a net whose signal shrinks per layer."""
    keys = [f"l{i:02d}_conv" for i in range(n_layers - 1)] + [f"l{n_layers - 1:02d}_fc"]
    first = {"epoch": 1, "train_loss": 2.30, "init/initial_loss": 2.30,
             "init/layer/l00_conv": "features.0"}
    last = {"epoch": 6, "train_loss": 2.30, "outcome": "stalled"}
    for i, k in enumerate(keys):
        first |= {f"init/act_std/{k}": shrink ** -i, f"init/act_std_pred/{k}": 1.05 * shrink ** -i,
                  f"init/grad_norm/{k}": 1e-12 * shrink ** i, f"init/update_ratio/{k}": 1e-4,
                  f"init/dead_frac/{k}": 0.0, f"init/gain_pred/{k}": shrink ** -2,
                  f"init/gain_meas/{k}": 1.1 * shrink ** -2}
        last |= {f"act_std/{k}": 2 * shrink ** -i, f"grad_norm/{k}": 0.0 if i == 0 else 1e-10,
                 f"update_ratio/{k}": 1e-8 * (i + 1), f"dead_frac/{k}": i / n_layers,
                 f"gain_meas/{k}": shrink ** -2, f"gain_pred/{k}": shrink ** -2}
    return first, last


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _axes(fig):
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_the_png_is_a_small_valid_image(tmp_path):
    first, last = _reports()
    path = layer_profile(first, last, tmp_path / "figures" / "t1.png")
    assert path == tmp_path / "figures" / "t1.png" and path.is_file()
    assert _png_size(path) == (800, 600)  # 8 x 6 in at 100 dpi
    assert 10_000 < path.stat().st_size < 400_000
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, nothing left beside it
    from PIL import Image

    with Image.open(path) as image:
        image.verify()


def test_log_axes_where_the_quantity_spans_decades():
    first, last = _reports()
    axes = _axes(_figure(first, last))
    assert set(axes) == {"activation std", "gradient norm", "update ratio |dW|/|W|",
                         "dead fraction", "gain E[y²]/E[x²]"}
    for title, ax in axes.items():
        assert ax.get_yscale() == ("linear" if title == "dead fraction" else "log"), title
    lo, hi = axes["dead fraction"].get_ylim()
    assert lo <= 0 and 1 <= hi < 1.1
    labels = {line.get_label() for line in axes["activation std"].get_lines()}
    assert labels == {"init", "epoch 6", "predicted (init)"}
    gain = {line.get_label() for line in axes["gain E[y²]/E[x²]"].get_lines()}
    assert {"predicted (init)", "measured (init)", "measured (epoch 6)"} <= gain
    # A zero gradient cannot sit on a log axis: it is a gap, not an error.
    now = next(l for l in axes["gradient norm"].get_lines() if l.get_label() == "epoch 6")
    assert math.isnan(now.get_ydata()[0]) and now.get_ydata()[1] == pytest.approx(1e-10)


def test_layer_order_follows_the_numbering_not_the_dict_or_the_text():
    keys = ["l9_conv", "l10_conv", "l99_conv", "l100_fc", "l02_conv"]
    shuffled = [(f"act_std/{k}", 1.0) for k in keys] + [("act_std/a00_conv", 1.0)]  # aux head
    random.Random(0).shuffle(shuffled)
    last = dict(shuffled)
    assert layer_keys({}, last) == ["l02_conv", "l9_conv", "l10_conv", "l99_conv", "l100_fc"]
    fig = _figure({}, last)
    ax = _axes(fig)["dead fraction"]
    assert [t.get_text() for t in ax.get_xticklabels()] == layer_keys(last)
    # and with the prefix: both dicts' layers are merged
    assert layer_keys({"init/grad_norm/l01_conv": 1.0}, {"act_std/l00_conv": 1.0}) == \
        ["l00_conv", "l01_conv"]


def test_missing_families_leave_their_panel_saying_so(tmp_path):
    first, last = _reports()
    only_std = {k: v for k, v in first.items() if k.startswith("init/act_std/")}
    last_std = {k: v for k, v in last.items() if k.startswith("act_std/") or k == "epoch"}
    fig = _figure(only_std, last_std)
    axes = _axes(fig)
    assert len(axes["activation std"].get_lines()) == 2  # init and now, no prediction
    for title in ("gradient norm", "update ratio |dW|/|W|", "dead fraction"):
        assert [t.get_text() for t in axes[title].texts] == ["not reported"], title
    assert set(profile_summary(only_std, last_std)) == {"profile/act_std_ratio_last_first",
                                                        "profile/act_std_ratio_last_first_now"}
    assert _png_size(layer_profile(only_std, last_std, tmp_path / "a.png")) == (800, 600)
    assert _png_size(layer_profile({}, {}, tmp_path / "empty.png")) == (800, 600)
    assert profile_summary({}, {}) == {}


def test_summary_says_where_the_signal_went():
    first, last = _reports(n_layers=8, shrink=10.0)
    s = profile_summary(first, last)
    assert s["profile/act_std_ratio_last_first"] == pytest.approx(1e-7)
    assert s["profile/act_std_ratio_last_first_now"] == pytest.approx(1e-7)
    assert s["profile/grad_norm_ratio_first_last"] == pytest.approx(1e-7)
    assert s["profile/gain_meas_geomean"] == pytest.approx(0.011)
    assert s["profile/min_update_ratio"] == pytest.approx(1e-8)
    assert s["profile/max_update_ratio"] == pytest.approx(8e-8)
    assert s["profile/max_dead_frac"] == pytest.approx(7 / 8)
    assert all(type(v) is float for v in s.values())


def test_step0_values_unprefixed_and_the_records_nan_strings_are_accepted():
    first, last = _reports()
    unprefixed = {k[len("init/"):]: v for k, v in first.items() if k.startswith("init/")}
    assert profile_summary(unprefixed, last) == profile_summary(first, last)
    last = {**last, "dead_frac/l03_conv": "nan", "update_ratio/l00_conv": "inf"}
    s = profile_summary(first, last)
    assert s["profile/max_update_ratio"] == pytest.approx(8e-8)  # inf is no update ratio to report
    assert math.isfinite(s["profile/max_dead_frac"])


def test_no_pyplot_state_is_left_behind(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    first, last = _reports()
    layer_profile(first, last, tmp_path / "p.png")
    assert plt.get_fignums() == before
