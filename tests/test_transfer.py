"""Transfer (sweeper.transfer): pretrained backbones, init from a trained trial, freezing.

Every source here is a state dict the test writes itself (a torchvision ResNet-18 with random weights
under a temporary TORCH_HOME stands in for torch.hub's cache): nothing is downloaded. The fast tests
train narrow nets on a few hundred synthetic images for an epoch or two; the two slow ones launch
real sweeps on a local Ray.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sweeper.config import ConfigError, TrialConfig
from sweeper.models import build_model
from sweeper.train import CHECKPOINT_FILE, _optimizer, fit
from sweeper.transfer import (FrozenBatchNorm2d, apply_transfer, input_normalization, main,
                              resolve_init_from, resolve_sweep, torchvision_file, units)

SMALL = {"data.name": "synthetic", "data.synthetic_size": 160, "data.resolution": 16,
         "data.batch_size": 32, "device": "cpu", "diagnostics.enabled": False, "epochs": 1,
         "optim.schedule": "constant", "optim.lr": 0.05, "model.width": 0.125}
R18 = {"model.arch": "resnet18", "model.batch_norm": True}


def _cfg(**flat) -> TrialConfig:
    return TrialConfig.from_flat({**SMALL, **flat})


def _fit_and_save(cfg: TrialConfig, where: Path) -> dict:
    """Train; keep the last epoch's checkpoint in ``where``; return its state."""
    def report(metrics, save):
        if metrics["epoch"] == cfg.epochs:
            save(where)

    fit(cfg, report=report)
    return torch.load(where / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _standin(path: Path, **flat) -> dict:
    """A random-weight plain state dict, as `python -m sweeper.transfer standin PATH epochs=0` writes."""
    settings = [f"{k}={v}" for k, v in {**R18, "model.width": 0.125, "epochs": 0, **flat}.items()]
    assert main(["standin", str(path), *settings]) == 0
    return torch.load(path, weights_only=True)


def _errors(fn) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    return "\n".join(info.value.problems)


# ---- freezing ---------------------------------------------------------------------------------------


def test_a_frozen_backbone_is_bit_identical_after_training_and_its_bn_statistics_unchanged(tmp_path):
    source = _standin(tmp_path / "standin.pt")
    # Weight decay and momentum on: a frozen parameter that reached the optimizer would move.
    cfg = _cfg(**R18, **{"model.pretrained": str(tmp_path / "standin.pt"), "model.freeze": "backbone",
                         "optim.weight_decay": 5e-3, "optim.momentum": 0.9,
                         "diagnostics.enabled": True, "diagnostics.counterfactuals": False})
    after = _fit_and_save(cfg, tmp_path / "ckpt")["model"]
    backbone = [k for k in after if not k.startswith("fc.")]
    assert len(backbone) > 100
    for k in backbone:  # parameters AND running_mean/var/num_batches_tracked
        assert torch.equal(after[k], source[k]), k
    assert not torch.equal(after["fc.weight"], build_model(cfg.model, num_classes=10).fc.weight)


def test_all_but_last_n_trains_exactly_the_last_n_blocks_and_the_head(tmp_path):
    source = _standin(tmp_path / "standin.pt")
    cfg = _cfg(**R18, **{"model.pretrained": str(tmp_path / "standin.pt"),
                         "model.freeze": "all_but_last:2"})
    after = _fit_and_save(cfg, tmp_path / "ckpt")["model"]
    for k in after:
        trains = k.startswith(("layer4.", "fc."))
        if k.startswith("fc."):
            continue
        same = torch.equal(after[k], source[k])
        if k.endswith("num_batches_tracked") or not trains:
            assert same == (not trains), k
        elif k.endswith(("conv1.weight", "conv2.weight")):
            assert not same, f"{k} should have trained"


def test_frozen_parameters_are_left_out_of_the_optimizer_and_frozen_bn_stays_in_eval():
    cfg = _cfg(**R18, **{"model.freeze": "all_but_last:1"})  # no source: random features, frozen
    model = build_model(cfg.model, num_classes=10)
    done = apply_transfer(model, cfg.model)
    assert done.source is None and done.frozen > 0
    optimizer = _optimizer(cfg, model)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_optimizer) == p.requires_grad == name.startswith(("layer4.1.", "fc.")), name
    for copy_ in (model.train(), copy.deepcopy(model).train()):  # deep copies: the counterfactual runs
        assert isinstance(copy_.layer1[0].bn1, FrozenBatchNorm2d) and not copy_.layer1[0].bn1.training
        assert copy_.layer4[1].bn1.training and type(copy_.layer4[1].bn1) is nn.BatchNorm2d
    assert units(model)[0][0] == ["stem"] and units(model)[1] == ["fc"]


def test_vgg_paper_head_dropout_of_a_frozen_hidden_layer_is_off():
    cfg = _cfg(**{"model.arch": "vgg11", "model.head": "paper", "model.freeze": "all_but_last:1"})
    model = build_model(cfg.model, num_classes=10)
    apply_transfer(model, cfg.model)
    model.train()
    blocks, head = units(model)
    assert head == ["head.8"] and blocks[-1][0] == "head.5" and blocks[-2][0] == "head.2"
    assert not model.head[4].training and model.head[7].training  # FC1 frozen, FC2 trains
    assert not model.head[2].weight.requires_grad and model.head[5].weight.requires_grad


# ---- pretrained: torchvision's cache and local files ---------------------------------------------------


@pytest.fixture
def fake_torch_home(tmp_path, monkeypatch):
    """A torchvision ResNet-18 state dict (random weights) where torch.hub's cache keeps the real one."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1")
    path = torchvision_file(weights)
    assert str(path).startswith(str(tmp_path / "torch"))
    path.parent.mkdir(parents=True)
    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, path)
    return state


def test_torchvision_weights_map_onto_our_resnet18_and_set_imagenet_normalisation(fake_torch_home):
    cfg = _cfg(**R18, **{"model.width": 1.0, "model.stem": "imagenet",
                         "model.pretrained": "ResNet18_Weights.IMAGENET1K_V1"})
    model = build_model(cfg.model, num_classes=10)
    done = apply_transfer(model, cfg.model)
    ours = model.state_dict()
    renamed = {"conv1.": "stem.conv.", "bn1.": "stem.bn."}
    checked = 0
    for k, v in fake_torch_home.items():
        if k.startswith("fc."):
            continue  # a new head: 10 classes, not 1000
        mine = k.replace(".downsample.0.", ".shortcut.conv.").replace(".downsample.1.", ".shortcut.bn.")
        for a, b in renamed.items():
            mine = b + mine[len(a):] if mine.startswith(a) else mine
        assert torch.equal(ours[mine], v), k
        checked += 1
    assert checked == len(done.copied) == len(ours) - 2  # every tensor but fc.weight, fc.bias
    with pytest.warns(UserWarning, match="trained on 224x224 inputs"):
        mean, std = input_normalization(cfg)
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])
    # The short name works for the configured arch.
    short = cfg.replace(**{"model.pretrained": "IMAGENET1K_V1"}).model
    assert len(apply_transfer(build_model(short, num_classes=10), short).copied) == checked


def test_a_torchvision_name_whose_file_is_not_cached_names_the_path_and_how_to_get_it(tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    cfg = _cfg(**R18, **{"model.width": 1.0, "model.stem": "imagenet",
                         "model.pretrained": "ResNet18_Weights.IMAGENET1K_V1"})
    text = _errors(lambda: apply_transfer(build_model(cfg.model, num_classes=10), cfg.model))
    assert "model.pretrained='ResNet18_Weights.IMAGENET1K_V1'" in text
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in text
    assert "never downloads" in text and "get_state_dict" in text


def test_bad_settings_are_refused_with_field_value_and_what_is_allowed():
    cases = {
        "model.freeze": ("half", "model.freeze='half' is not one of 'none', 'backbone', 'all_but_last:N'"),
        "model.init_layers": ("convs", "model.init_layers='convs' is not one of ['all', 'backbone',"),
        "model.pretrained": ("ResNet18_Weights.NOPE", "model.pretrained='ResNet18_Weights.NOPE' is not a "
                             "torchvision weights name nor a file path (for model.arch='resnet18': "
                             "ResNet18_Weights.IMAGENET1K_V1)"),
        "model.init_from": ("sweep:/best", "model.init_from='sweep:/best' is not a sweep reference"),
    }
    for key, (value, expected) in cases.items():
        text = _errors(lambda: _cfg(**R18, **{"model.stem": "imagenet", key: value}))
        assert expected in text, (key, text)
    text = _errors(lambda: _cfg(**{"model.arch": "vgg11", "model.pretrained": "ResNet18_Weights.IMAGENET1K_V1"}))
    assert "is for another architecture: model.arch='vgg11' (batch_norm=False) takes VGG11_Weights." in text
    text = _errors(lambda: _cfg(**{"model.arch": "resnet18", "model.pretrained": "IMAGENET1K_V1"}))
    assert "set model.stem='imagenet'" in text and "set model.batch_norm=true" in text
    text = _errors(lambda: _cfg(**{"model.pretrained": "a.pt", "model.init_from": "b.pt"}))
    assert "are both set" in text
    text = _errors(lambda: _cfg(**R18, **{"model.init_from": "x.pt", "model.init_layers": "vgg_paper"}))
    assert "model.arch='resnet18' is no VGG" in text


def test_missing_file_shape_mismatch_and_too_many_blocks_are_errors_naming_the_key(tmp_path):
    cfg = _cfg(**R18, **{"model.pretrained": str(tmp_path / "nope.pt")})
    text = _errors(lambda: apply_transfer(build_model(cfg.model, num_classes=10), cfg.model))
    assert f"model.pretrained='{tmp_path / 'nope.pt'}': no such file or checkpoint" in text

    _standin(tmp_path / "narrow.pt")  # width 1/8
    wide = _cfg(**R18, **{"model.width": 0.25, "model.pretrained": str(tmp_path / "narrow.pt")}).model
    text = _errors(lambda: apply_transfer(build_model(wide, num_classes=10), wide))
    assert "backbone tensor(s) differ in shape from the model" in text
    assert "stem.conv.weight: source (8, 3, 3, 3), model (16, 3, 3, 3)" in text

    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    junk = _cfg(**R18, **{"model.pretrained": str(tmp_path / "junk.pt")}).model
    assert "cannot be read as a state dict" in _errors(
        lambda: apply_transfer(build_model(junk, num_classes=10), junk))

    deep = _cfg(**R18, **{"model.freeze": "all_but_last:9"}).model
    assert "keeps 9 blocks training, but model.arch='resnet18' has only 9 backbone blocks" in _errors(
        lambda: apply_transfer(build_model(deep, num_classes=10), deep))


def test_a_partial_file_loads_what_matches_and_the_head_stays_new(tmp_path):
    state = _standin(tmp_path / "full.pt")
    partial = {k: v for k, v in state.items() if k.startswith(("stem.", "layer1."))}
    partial["fc.weight"] = torch.zeros(1000, 64)  # another head: ignored with init_layers=backbone
    torch.save({"model": partial, "config": {"model.arch": "resnet18"}}, tmp_path / "trial_state.pt")
    cfg = _cfg(**R18, **{"model.pretrained": str(tmp_path / "trial_state.pt")})
    model = build_model(cfg.model, num_classes=10)
    done = apply_transfer(model, cfg.model)
    assert set(done.copied) == {k for k in partial if not k.startswith("fc.")} and done.skipped == 1
    assert "copied" in done.describe() and done.metrics()["transfer_tensors"] == len(done.copied)


def test_init_layers_none_is_exactly_the_from_scratch_model(tmp_path):
    _standin(tmp_path / "s.pt")
    scratch = _cfg(**R18)
    control = _cfg(**R18, **{"model.pretrained": str(tmp_path / "s.pt"), "model.init_layers": "none"})
    torch.manual_seed(0)
    a = build_model(scratch.model, num_classes=10)
    torch.manual_seed(0)
    b = build_model(control.model, num_classes=10)
    assert not apply_transfer(b, control.model).copied
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- init_from: a trained VGG-A into deeper VGGs ------------------------------------------------------


@pytest.fixture(scope="module")
def vgg_a(tmp_path_factory):
    """A VGG-A (vgg11, width 1/8, BN) trained one epoch: its checkpoint directory and state."""
    where = tmp_path_factory.mktemp("vgg_a") / "checkpoint_000000"
    state = _fit_and_save(_cfg(**{"model.arch": "vgg11", "model.batch_norm": True}), where)
    return where, state


# The paper's "first four conv layers" of A by Caffe name (conv1_1, conv2_1, conv3_1, conv3_2) -> the
# layers of the same names in D and E (identical there), as features indices, without and with BN.
PAPER_MAP = {False: {"features.0": "features.0", "features.3": "features.5",
                     "features.6": "features.10", "features.8": "features.12"},
             True: {"features.0": "features.0", "features.4": "features.7",
                    "features.8": "features.14", "features.11": "features.17"}}


def _bn_of(conv: str) -> str:
    return f"features.{int(conv.split('.')[1]) + 1}"


def test_vgg_paper_copies_the_first_four_convs_and_the_head_from_vgg_a_into_d_and_e(vgg_a):
    where, state = vgg_a
    src = state["model"]
    for arch in ("vgg16", "vgg19"):
        cfg = _cfg(**{"model.arch": arch, "model.batch_norm": True, "model.init": "normal",
                      "model.init_from": str(where), "model.init_layers": "vgg_paper"}).model
        model = build_model(cfg, num_classes=10)
        done = apply_transfer(model, cfg)
        ours = model.state_dict()
        for s, t in PAPER_MAP[True].items():
            for leaf in ("weight", "bias"):
                assert torch.equal(ours[f"{t}.{leaf}"], src[f"{s}.{leaf}"]), (arch, s, t)
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                assert torch.equal(ours[f"{_bn_of(t)}.{leaf}"], src[f"{_bn_of(s)}.{leaf}"])
        assert torch.equal(ours["head.2.weight"], src["head.2.weight"])
        # Every other conv keeps the model's own (random, N(0, 0.01^2)) init.
        others = [k for k, v in ours.items() if v.dim() == 4 and k[:-7] not in PAPER_MAP[True].values()]
        assert others and all(float(ours[k].std()) < 0.02 for k in others)
        assert len(done.copied) == 4 * 2 + 4 * 5 + 2  # 4 convs (w, b), 4 BNs (5 tensors), 1 linear
        assert done.source == str(where)


def test_vgg_paper_refuses_another_head_or_width_and_all_copies_every_matching_tensor(vgg_a):
    where, state = vgg_a
    # batch_norm as the source's: a BN-trained source into a net without BN is refused first.
    paper = _cfg(**{"model.arch": "vgg16", "model.head": "paper", "model.init_from": str(where),
                    "model.batch_norm": True, "model.init_layers": "vgg_paper"}).model
    text = _errors(lambda: apply_transfer(build_model(paper, num_classes=10), paper))
    assert "the source has 1 and the model 3" in text and "model.head must be the source's" in text
    wide = _cfg(**{"model.arch": "vgg16", "model.width": 0.25, "model.init_from": str(where),
                   "model.batch_norm": True, "model.init_layers": "vgg_paper"}).model
    text = _errors(lambda: apply_transfer(build_model(wide, num_classes=10), wide))
    assert "features.0.weight (8, 3, 3, 3) -> features.0.weight (16, 3, 3, 3)" in text

    same = _cfg(**{"model.arch": "vgg11", "model.batch_norm": True, "model.init_from": str(where)}).model
    model = build_model(same, num_classes=10)
    done = apply_transfer(model, same)  # init_layers None -> 'all'
    assert done.layers == "all" and len(done.copied) == len(state["model"])
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())


def _fake_sweep(root: Path, name: str, checkpoint_dir: Path) -> list[dict]:
    """A sweep record with two finished trials, the better one's checkpoint at checkpoint_dir."""
    from sweeper.records import SweepRecord

    record = SweepRecord(root / name)
    record.create({"name": name, "metric": "val_accuracy", "mode": "max"}, "")
    rel = checkpoint_dir.relative_to(root / name)
    # As the driver writes them: the checkpoint's location and epoch together, the last epoch's metrics.
    trials = [{"trial_id": "aaa_00000", "name": "vgg11-he-plain-lr0.01", "created": 1,
               "best": {"val_accuracy": 0.4}, "last": {"epoch": 2, "val_accuracy": 0.4},
               "checkpoint": "t0/checkpoint_000001", "checkpoint_epoch": 2},
              {"trial_id": "aaa_00001", "name": "vgg11-he-plain-lr0.03", "created": 2,
               "best": {"val_accuracy": 0.9}, "last": {"epoch": 4, "val_accuracy": 0.9},
               "checkpoint": str(rel), "checkpoint_epoch": 4}]
    for t in trials:
        record.write_trial(t["trial_id"], t)
    return trials


def test_a_sweep_reference_resolves_to_its_trials_checkpoint_and_bad_ones_say_what_exists(
        tmp_path, vgg_a, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)  # ./sweeps is looked in too: keep it empty
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path / "cache"))
    store = tmp_path / "store"
    ckpt = store / "vgg_a" / "t1" / "checkpoint_000003"
    shutil.copytree(vgg_a[0], ckpt)
    _fake_sweep(store, "vgg_a", ckpt)
    location, what = resolve_init_from("sweep:vgg_a/best", storage=str(store))
    assert location == str(ckpt) and "vgg11-he-plain-lr0.03" in what and "0.9" in what
    assert resolve_init_from("sweep:vgg_a/aaa_00001", storage=str(store))[0] == str(ckpt)
    assert resolve_init_from("sweep:vgg_a", storage=str(store))[0] == str(ckpt)  # best by default

    text = _errors(lambda: resolve_init_from("sweep:vgg_b/best", storage=str(store)))
    assert "model.init_from='sweep:vgg_b/best': no sweep named 'vgg_b' under" in text
    assert "(sweeps there: vgg_a)" in text and "launch the source sweep first" in text
    text = _errors(lambda: resolve_init_from("sweep:vgg_a/zzz", storage=str(store)))
    assert "model.init_from='sweep:vgg_a/zzz': sweep 'vgg_a' has no trial 'zzz'" in text
    assert "aaa_00000, aaa_00001" in text

    from sweeper.spaces import Sweep

    sweep = Sweep(name="vgg_de", storage=str(store), space={
        "model.arch": "vgg16", "model.width": 0.125, "model.init_layers": "vgg_paper",
        "model.init_from": {"grid_search": [None, "sweep:vgg_a/best"]}})
    resolved, notes = resolve_sweep(sweep)
    assert resolved.space["model.init_from"] == {"grid_search": [None, str(ckpt)]}
    assert len(notes) == 1 and str(ckpt) in notes[0]
    # A trial that still holds a reference (sweeper debug) resolves it itself.
    cfg = _cfg(**{"model.arch": "vgg16", "model.batch_norm": True, "model.init_layers": "vgg_paper",
                  "model.init_from": "sweep:vgg_a/best"}).model
    assert apply_transfer(build_model(cfg, num_classes=10), cfg, storage=str(store)).source == str(ckpt)


def test_standin_writes_a_trained_plain_state_dict(tmp_path):
    t0 = time.time()
    assert main(["standin", str(tmp_path / "s.pt"), "epochs=1", "data.synthetic_size=96",
                 "data.resolution=16"]) == 0
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert "stem.conv.weight" in state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert time.time() - t0 < 20


# ---- end to end on a local Ray (slow) ----------------------------------------------------------------


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.ray
def test_quick_finetune_vs_scratch_runs_every_cell_offline(tmp_path):
    from conftest import run_sweeper
    from sweeper.records import SweepRecord

    standin = tmp_path / "standin.pt"
    assert main(["standin", str(standin), "epochs=1", "data.synthetic_size=256"]) == 0
    t0 = time.time()
    out = run_sweeper("launch", str(ROOT / "search_spaces" / "finetune_vs_scratch.py"), "--local",
                      "--storage", str(tmp_path / "sweeps"), "--quiet", "--num-cpus", "2",
                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                      *QUICK_FINETUNE, f"model.pretrained={standin}", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = SweepRecord(tmp_path / "sweeps" / "finetune_vs_scratch").trials()
    cells = {(t["config"]["model.freeze"], t["config"]["model.init_layers"]) for t in trials}
    assert len(cells) == 6, cells
    assert all(t["outcome"] in ("completed", "pruned", "stalled", "late_start") for t in trials)
    assert time.time() - t0 < 120


# The docstring's quick form, cut to 1 epoch on 400 digits without diagnostics to stay near a minute.
QUICK_FINETUNE = ["dataset=digits", "width=1/8", "model.stem=cifar", "data.resolution=None",
                  "data.crop_padding=4", "max_epochs=1", "grace_period=1", "num_samples=1", "lr=0.03", "limit=400",
                  "diagnostics.enabled=false"]


@pytest.mark.slow
@pytest.mark.ray
def test_a_target_sweep_starts_from_the_best_trial_of_a_source_sweep(tmp_path):
    from conftest import run_sweeper
    from sweeper.checkpoints import load_trial_state
    from sweeper.records import SweepRecord

    common = ["--local", "--storage", str(tmp_path / "sweeps"), "--quiet", "--num-cpus", "2",
              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "dataset=digits", "width=1/8",
              "max_epochs=1", "num_samples=1", "limit=300", "diagnostics.enabled=false"]
    space = tmp_path / "one.py"
    space.write_text('"""One trial."""\nfrom sweeper.spaces import Sweep\n'
                     'SWEEP = Sweep(name="src", space={"model.arch": "vgg11", "optim.lr": 0.02})\n')
    src = run_sweeper("launch", str(space), *common, cwd=tmp_path, timeout=300)
    assert src.returncode == 0, src.stdout[-3000:] + src.stderr[-3000:]
    target = run_sweeper("launch", str(space), "--name", "dst", *common, "model.arch=vgg16",
                         "model.init_from=sweep:src/best", "model.init_layers=vgg_paper",
                         cwd=tmp_path, timeout=300)
    assert target.returncode == 0, target.stdout[-3000:] + target.stderr[-3000:]
    source_trial = SweepRecord(tmp_path / "sweeps" / "src").trials()[0]
    source_ckpt = tmp_path / "sweeps" / "src" / source_trial["checkpoint"]
    dst = SweepRecord(tmp_path / "sweeps" / "dst").trials()[0]
    # The trial's config records the checkpoint it was initialised from, not the reference.
    assert dst["config"]["model.init_from"] == str(source_ckpt)
    # Step 0 is not checkpointed: rebuild it exactly as the trial (and its counterfactuals) did.
    from sweeper.counterfactual import rebuild_initial_model

    cfg = TrialConfig.from_flat(dst["config"])
    model = rebuild_initial_model(cfg, 10, torch.device("cpu"))
    src_sd = load_trial_state(str(source_ckpt))["model"]
    for s, t in PAPER_MAP[False].items():
        assert torch.equal(model.state_dict()[f"{t}.weight"], src_sd[f"{s}.weight"])
    assert torch.equal(model.state_dict()["head.2.weight"], src_sd["head.2.weight"])
    epochs = SweepRecord(tmp_path / "sweeps" / "dst").epochs(dst["trial_id"])
    assert epochs[0]["init/transfer_tensors"] == 10.0
    assert json.dumps(dst["config"])  # JSON-safe params


def test_each_node_is_asked_for_the_sources_its_trials_will_read(tmp_path, monkeypatch):
    """On a cluster a weights file on the launching machine's disk is not on the workers: the
    per-node check (sweeper.preflight.check_node, run on every node before trials) names it."""
    from ray import tune

    from sweeper.spaces import Sweep
    from sweeper.transfer import source_files
    from sweeper.preflight import check_node

    here = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, here)
    sweep = Sweep(name="s", space={"model.arch": "resnet18", "model.batch_norm": True,
                                   "model.pretrained": str(here),
                                   "model.init_layers": tune.grid_search(["backbone", "none"])})
    sources = source_files(sweep)
    assert sources == [("model.pretrained", str(here))]  # the scratch arm (init_layers=none) reads none
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert check_node(str(tmp_path / "store"), [], False, sources) == []
    here.unlink()  # as a worker without the file sees it
    (problem,) = check_node(str(tmp_path / "store"), [], False, sources)
    assert problem.startswith(f"model.pretrained: {str(here)!r} is not on this machine")
    tv = Sweep(name="t", space={"model.arch": "resnet18", "model.batch_norm": True,
                                "model.stem": "imagenet", "model.pretrained": "IMAGENET1K_V1"})
    ((key, where),) = source_files(tv)  # a torchvision name: its file in that node's torch.hub cache
    assert key == "model.pretrained" and where.startswith(str(tmp_path / "torch"))


# ---- regressions: sources that load but cannot mean what they would be copied as --------------------


def test_a_diverged_source_with_non_finite_weights_is_refused_naming_the_key(tmp_path):
    # Before: the NaN weights were copied and the trial "diverged" at step 0 (exit 1, no hint why).
    state = _standin(tmp_path / "s.pt")
    state["layer1.0.conv1.weight"] = torch.full_like(state["layer1.0.conv1.weight"], float("nan"))
    torch.save({"model": state, "config": {}}, tmp_path / "trial_state.pt")
    cfg = _cfg(**R18, **{"model.init_from": str(tmp_path)}).model
    text = _errors(lambda: apply_transfer(build_model(cfg, num_classes=10), cfg))
    assert f"model.init_from='{tmp_path}' holds non-finite weights (1 tensor(s), e.g. " \
           "layer1.0.conv1.weight): a diverged trial's checkpoint?" in text


def test_batchnorm_trained_weights_into_a_net_without_batchnorm_are_refused(tmp_path):
    # Before: the convs were copied, the BN tensors silently skipped, and the loss exploded (~1e19).
    _standin(tmp_path / "bn.pt")  # model.batch_norm=True
    cfg = _cfg(**{**R18, "model.batch_norm": False, "model.pretrained": str(tmp_path / "bn.pt")}).model
    text = _errors(lambda: apply_transfer(build_model(cfg, num_classes=10), cfg))
    assert f"model.pretrained='{tmp_path / 'bn.pt'}' was trained with BatchNorm layers (e.g. stem.bn) " \
           "and this model has none: its convs expect the BN after them; set model.batch_norm=true" in text
    # The other way (plain source, BN model) stays allowed: BN renormalises what it is given.
    _standin(tmp_path / "plain.pt", **{"model.batch_norm": False})
    ok = _cfg(**{**R18, "model.pretrained": str(tmp_path / "plain.pt")}).model
    assert apply_transfer(build_model(ok, num_classes=10), ok).copied


def test_a_directory_an_empty_file_and_a_text_file_say_what_they_are(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello\n")
    expected = {"d": "is a directory without trial_state.pt",
                "empty.pt": "cannot be read as a state dict: the file is empty",
                "text.pt": "cannot be read as a state dict: not a file torch.save wrote"}
    for name, message in expected.items():
        m = _cfg(**R18, **{"model.pretrained": str(tmp_path / name)}).model
        assert f"model.pretrained='{tmp_path / name}' {message}" in \
            _errors(lambda: apply_transfer(build_model(m, num_classes=10), m)), name


def test_debug_with_a_diverged_source_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from sweeper.cli import app

    state = _standin(tmp_path / "s.pt")
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                for k, v in state.items()}, tmp_path / "nan.pt")
    result = CliRunner().invoke(app, ["debug", "data.name=synthetic", "data.synthetic_size=64",
                                      "model.arch=resnet18", "model.batch_norm=true", "width=1/8",
                                      f"model.pretrained={tmp_path / 'nan.pt'}", "--epochs", "1",
                                      "--no-diagnostics", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert f"error: model.pretrained='{tmp_path / 'nan.pt'}' holds non-finite weights" in \
        " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_sweep_best_ranks_checkpoints_and_never_picks_a_diverged_trial(tmp_path, monkeypatch):
    # Before: 'best' took the trial with the best epoch anywhere -- here the one that peaked and then
    # diverged, whose (latest-epoch) checkpoint holds NaN weights; and a trial whose checkpoint had
    # degraded since its peak. Now: the best metric at the checkpoint epoch, diverged trials excluded.
    from sweeper.records import SweepRecord

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path / "cache"))
    record = SweepRecord(tmp_path / "store" / "src")
    record.create({"name": "src", "metric": "val_accuracy", "mode": "max"}, "")
    for tid, name, peak, last, outcome in [("t_0", "peaked-then-nan", 0.99, float("nan"), "diverged"),
                                           ("t_1", "peaked-then-worse", 0.95, 0.30, "completed"),
                                           ("t_2", "steady", 0.60, 0.50, "completed")]:
        record.write_trial(tid, {"trial_id": tid, "name": name, "created": 1, "outcome": outcome,
                                 "best": {"epoch": 1, "val_accuracy": peak},
                                 "last": {"epoch": 2, "val_accuracy": last},
                                 "checkpoint": f"{name}/checkpoint_000001", "checkpoint_epoch": 2})
    location, what = resolve_init_from("sweep:src/best", storage=str(tmp_path / "store"))
    assert location.endswith("steady/checkpoint_000001"), location
    assert what == "trial steady (t_2, best val_accuracy 0.5 at its checkpoint epoch 2) of sweep 'src'"

    record.write_trial("t_2", {**record.find_trial("t_2"), "outcome": "diverged"})
    record.write_trial("t_1", {**record.find_trial("t_1"), "last": {"epoch": 2, "val_accuracy": None}})
    text = _errors(lambda: resolve_init_from("sweep:src", storage=str(tmp_path / "store")))
    assert "model.init_from='sweep:src': sweep 'src' has no trial to copy as 'best' (diverged: " \
           "peaked-then-nan, steady; no finite val_accuracy at its checkpoint epoch: peaked-then-worse)" in text


def test_standin_refuses_a_directory_a_file_as_folder_and_bad_epochs_before_training(tmp_path, capsys):
    # Before: a traceback and exit 1 -- for a directory only after training for 2 epochs.
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.pt").write_text("x")
    cases = {(str(tmp_path / "dir"),): f"error: '{tmp_path / 'dir'}' is a directory: give the file to "
                                        f"write, e.g. '{tmp_path / 'dir' / 'standin.pt'}'",
             (str(tmp_path / "file.pt" / "s.pt"), "epochs=0"):
                 f"error: '{tmp_path / 'file.pt' / 's.pt'}': '{tmp_path / 'file.pt'}' is a file, not a folder",
             (str(tmp_path / "s.pt"), "epochs=abc"): "error: epochs='abc' must be an integer >= 0",
             (str(tmp_path / "s.pt"), "epochs=1.5"): "error: epochs=1.5 must be an integer >= 0"}
    t0 = time.time()
    for args, message in cases.items():
        assert main(["standin", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert time.time() - t0 < 2 and not (tmp_path / "s.pt").exists()


def test_debug_says_what_was_copied_and_frozen(tmp_path):
    from sweeper.local import _transfer_line

    assert _transfer_line(_cfg()) is None  # nothing to transfer, nothing said
    path = tmp_path / "sd.pt"
    torch.save(build_model(_cfg(**{"model.arch": "smallcnn", "model.width": 0.25}).model,
                           num_classes=10).state_dict(), path)
    line = _transfer_line(_cfg(**{"model.arch": "smallcnn", "model.width": 0.25,
                                  "model.init_from": str(path), "model.freeze": "backbone"}))
    assert line.startswith("model: copied ") and str(path) in line and "froze" in line


def test_a_trial_started_from_a_torchvision_fine_tuned_trial_sees_imagenet_normalised_inputs(tmp_path):
    """Its source was fed ImageNet-normalised images; its features expect them (the source's
    config travels in its checkpoint). A source trained on the dataset's statistics keeps those."""
    from sweeper.transfer import input_normalization

    tuned = {"model.arch": "resnet18", "model.batch_norm": True, "model.stem": "imagenet",
             "model.pretrained": "IMAGENET1K_V1", "data.resolution": 224}
    sd = build_model(TrialConfig.from_flat(tuned).model, num_classes=10).state_dict()
    source = tmp_path / "tuned" / CHECKPOINT_FILE
    source.parent.mkdir()
    torch.save({"model": sd, "config": TrialConfig.from_flat(tuned).to_flat()}, source)
    target = TrialConfig.from_flat({**tuned, "model.pretrained": None,
                                    "model.init_from": str(source.parent)})
    mean, std = input_normalization(target)
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])
    chained = tmp_path / "chained" / CHECKPOINT_FILE  # a trial started from that trial: inherited too
    chained.parent.mkdir()
    torch.save({"model": sd, "config": target.to_flat()}, chained)
    assert input_normalization(target.replace(**{"model.init_from": str(chained.parent)}))[0] == \
        pytest.approx([0.485, 0.456, 0.406])
    scratch = tmp_path / "scratch" / CHECKPOINT_FILE
    scratch.parent.mkdir()
    torch.save({"model": sd, "config": {**target.to_flat(), "model.init_from": None}}, scratch)
    assert input_normalization(target.replace(**{"model.init_from": str(scratch.parent)})) is None
    assert input_normalization(target.replace(**{"model.init_layers": "none"})) is None
