"""Soft-voting ensembles (`sweeper ensemble`): the averaging itself, member selection, the refusals,
the MLflow run (one per set of member checkpoints), and a real sweep end to end (slow).

The fast tests build a sweep record by hand around checkpoints trained by ``sweeper.train.fit`` on the
embedded digits data (no Ray); the slow one launches a tiny sweep through the CLI.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sweeper.cli import EXIT_UNDELIVERED, EXIT_USAGE, app
from sweeper.ensemble import (ensemble_id, evaluate_ensemble, log_ensemble,
                              mean_probabilities, predict_probabilities, scores, select_members)
from sweeper.records import SweepRecord

ROOT = Path(__file__).resolve().parent.parent
BASE = {"model.arch": "vgg11", "model.width": 0.125, "model.batch_norm": True, "data.name": "digits",
        "data.limit": 64, "diagnostics.enabled": False, "epochs": 1}  # ~0.6 s of training each


# ---- the averaging ----------------------------------------------------------------------------------

# Three members, three classes, one example whose label is class 0. Member 0 is sure of class 0 but
# gives class 2 a large logit too; members 1 and 2 lean weakly to class 1, with class 2 close behind.
#   mean of softmax:  [0.381, 0.293, 0.326] -> class 0 (right)
#   mean of logits:   [3.33, -6.0, 3.43]    -> class 2 (member 0's large logits carry the vote)
#   majority vote:    0, 1, 1               -> class 1
# A second example is the first with its classes rotated (label 1), so the answers are not all "0".
LOGITS = torch.tensor([[[10.0, -20.0, 8.5]], [[0.0, 1.0, 0.9]], [[0.0, 1.0, 0.9]]])
LABELS = torch.tensor([0, 1])


class Fixed(torch.nn.Module):
    """A 'model' that returns given logits for example i (x holds the example indices)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x.long()]


def _member_logits() -> list[torch.Tensor]:
    return [torch.cat([m, m.roll(1, dims=1)]) for m in LOGITS]  # [2 examples, 3 classes] each


def test_ensemble_accuracy_comes_from_averaged_probabilities_not_logits_or_votes():
    batches = [(torch.tensor([0]), LABELS[:1]), (torch.tensor([1]), LABELS[1:])]  # two batches
    probs = []
    for logits in _member_logits():
        p, labels = predict_probabilities(Fixed(logits), batches)
        assert torch.equal(labels, LABELS)
        probs.append(p)
    ensemble = scores(mean_probabilities(probs), LABELS)

    stacked = torch.stack(_member_logits())
    by_logits = stacked.mean(0).argmax(1)
    votes = stacked.argmax(2)  # [members, examples]
    by_votes = torch.mode(votes, dim=0).values
    by_probs = torch.softmax(stacked, dim=2).mean(0).argmax(1)
    # The construction: the three rules disagree on every example, and only the mean of
    # probabilities is right.
    assert by_probs.tolist() == [0, 1]
    assert by_logits.tolist() == [2, 0]
    assert by_votes.tolist() == [1, 2]
    assert ensemble["accuracy"] == 1.0 and ensemble["top1_error"] == 0.0
    # No member is right on its own, so the ensemble's accuracy is no member's.
    assert [scores(p, LABELS)["accuracy"] for p in probs] == [1.0, 0.0, 0.0]
    assert ensemble["loss"] == pytest.approx(-torch.log(torch.tensor([0.3807, 0.3807])).mean().item(),
                                             abs=1e-3)


def test_top5_error_uses_min_5_classes_and_the_mean():
    probs = [torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.1, 0.1, 0.8]])]
    result = scores(mean_probabilities(probs), torch.tensor([0]))
    assert result["top1_error"] == 1.0  # mean [0.3, 0.2, 0.5]: class 2
    assert result["top5_error"] == 0.0  # top-3 of 3 classes holds every label


# ---- a sweep record around real checkpoints (no Ray) -------------------------------------------


def _write_trial(exp: Path, record: SweepRecord, trial_id: str, name: str, flat: dict,
                 history: list[dict], *, checkpoint: bool = True, outcome: str = "completed",
                 metric: str = "val_accuracy") -> None:
    best = max(history, key=lambda r: r.get(metric, float("-inf")))
    rec = {"trial_id": trial_id, "name": name, "config": flat, "created": time.time(),
           "status": "finished", "epochs": len(history), "last": history[-1], "best": best,
           "outcome": outcome}
    if checkpoint:
        rec.update(checkpoint=f"{name}-{trial_id}/checkpoint_000000",
                   checkpoint_epoch=int(history[-1]["epoch"]))
    record.write_trial(trial_id, rec)
    for row in history:
        record.append_epoch(trial_id, row)


def _fit(flat: dict, directory: Path) -> list[dict]:
    from sweeper.config import TrialConfig
    from sweeper.train import fit

    def report(metrics, save):
        save(directory)  # one checkpoint dir, overwritten: the latest epoch, as Tune keeps it

    result = fit(TrialConfig.from_flat(flat), report=report)
    return [{k: v for k, v in row.items() if isinstance(v, (int, float, str))} for row in result.history]


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
    """Sweep 'fake' under a storage dir: 3 digits trials and 1 synthetic trial with real checkpoints."""
    root = tmp_path_factory.mktemp("ens-storage")
    exp = root / "fake"
    record = SweepRecord(exp)
    record.create({"name": "fake", "sweep_uid": uuid.uuid4().hex, "metric": "val_accuracy",
                   "mode": "max"}, "")
    trials = {
        "t0": ("lr0.05-s1", {**BASE, "optim.lr": 0.05, "seed": 1}),
        "t1": ("lr0.02-s2", {**BASE, "optim.lr": 0.02, "seed": 2}),
        "t2": ("lr0.1-s3", {**BASE, "optim.lr": 0.1, "seed": 3}),
        "t3": ("synthetic", {**BASE, "data.name": "synthetic", "data.synthetic_size": 64,
                             "optim.lr": 0.05, "seed": 1}),
    }
    for trial_id, (name, flat) in trials.items():
        history = _fit(flat, exp / f"{name}-{trial_id}" / "checkpoint_000000")
        _write_trial(exp, record, trial_id, name, flat, history)
    return root, record


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _independent_accuracy(root: Path, trial_ids: list[str], record: SweepRecord) -> float:
    """The ensemble's test accuracy computed from scratch: the whole test set in one batch,
    normalised by hand with each member's own training statistics."""
    from sweeper.config import TrialConfig
    from sweeper.data import load_splits
    from sweeper.models import build_model

    probs, labels = [], None
    for tid in trial_ids:
        t = record.trial(tid)
        state = torch.load(root / "fake" / t["checkpoint"] / "trial_state.pt", weights_only=True)
        cfg = TrialConfig.from_flat(state["config"])
        splits = load_splits(cfg.data, seed=cfg.seed)
        model = build_model(cfg.model, num_classes=len(splits.classes))
        model.load_state_dict(state["model"])
        model.eval()
        x = (splits.test_x.float() / 255 - splits.mean.view(1, 3, 1, 1)) / splits.std.view(1, 3, 1, 1)
        with torch.no_grad():
            probs.append(torch.softmax(model(x), dim=1))
        assert labels is None or torch.equal(labels, splits.test_y)
        labels = splits.test_y
    return (torch.stack(probs).mean(0).argmax(1) == labels).double().mean().item()


def test_members_are_ranked_by_the_metric_at_their_checkpoint_epoch(tmp_path):
    """A trial that peaked early ranks by what its checkpoint (its last epoch) holds."""
    exp = tmp_path / "s"
    record = SweepRecord(exp)
    record.create({"name": "s", "sweep_uid": "u", "metric": "val_accuracy", "mode": "max"}, "")
    rows = lambda *vals: [{"epoch": i + 1, "val_accuracy": v} for i, v in enumerate(vals)]  # noqa: E731
    _write_trial(exp, record, "a", "peaked", {**BASE}, rows(0.9, 0.5))
    _write_trial(exp, record, "b", "steady", {**BASE}, rows(0.6, 0.7))
    _write_trial(exp, record, "c", "diverged", {**BASE}, rows(0.95, 0.0), outcome="diverged")
    _write_trial(exp, record, "d", "nockpt", {**BASE}, rows(0.99, 0.99), checkpoint=False)
    members, words = select_members(record, sweep="s", storage_root=str(tmp_path), top=2)
    assert [m.trial_id for m in members] == ["b", "a"]
    assert (members[1].value, members[1].best_value, members[1].best_epoch) == (0.5, 0.9, 1)
    assert members[0].location == str(tmp_path / "s" / "steady-b" / "checkpoint_000000")
    assert "checkpoint epoch" in words
    with pytest.raises(Exception) as err:  # trials asked for by name are members, or refused
        select_members(record, sweep="s", storage_root=str(tmp_path), top=None,
                       trials=["b", "c", "nockpt"])
    assert "'diverged' (diverged)" in str(err.value) and "'nockpt' (no checkpoint)" in str(err.value)
    with pytest.raises(Exception) as err:
        select_members(record, sweep="s", storage_root=str(tmp_path), top=3)
    assert "--top 3" in str(err.value) and "choose 1..2" in str(err.value)
    # loss-like metrics rank the other way
    record.update_meta(mode="min")
    members, _ = select_members(record, sweep="s", storage_root=str(tmp_path), top=1)
    assert [m.trial_id for m in members] == ["a"]


def test_where_and_trials_narrow_the_candidates(fake_sweep):
    root, record = fake_sweep
    members, words = select_members(record, sweep="fake", storage_root=str(root), top=None,
                                    trials=["t0,lr0.02-s2"])
    assert sorted(m.trial_id for m in members) == ["t0", "t1"]
    members, words = select_members(record, sweep="fake", storage_root=str(root), top=1,
                                    where=["lr=0.1", "outcome=completed"])
    assert [m.trial_id for m in members] == ["t2"] and "optim.lr=0.1" in words
    members, _ = select_members(record, sweep="fake", storage_root=str(root), top=3,
                                where=["dataset=digits"])
    assert sorted(m.trial_id for m in members) == ["t0", "t1", "t2"]


def test_evaluate_ensemble_matches_an_independent_recomputation(fake_sweep):
    root, record = fake_sweep
    members, words = select_members(record, sweep="fake", storage_root=str(root), top=3,
                                    where=["data.name=digits"])
    result = evaluate_ensemble(members, device="cpu", sweep="fake", sweep_uid="u",
                               metric="val_accuracy", mode="max", selection=words)
    ids = [m.trial_id for m in members]
    assert result.ensemble["accuracy"] == pytest.approx(_independent_accuracy(root, ids, record),
                                                        abs=1e-12)
    assert result.examples == 359  # digits: 20% of 1797, the same for every seed
    # each member's own test score, evaluated now, is what its trial recorded at its last epoch
    for m in members:
        recorded = record.trial(m.trial_id)["last"]
        assert result.member_scores[m.trial_id]["accuracy"] == pytest.approx(
            recorded["test_accuracy"], abs=1e-9)
        assert result.member_scores[m.trial_id]["top5_error"] == pytest.approx(
            recorded["test_top5_error"], abs=1e-9)
    # the identity does not depend on the members' order, and does on their checkpoints
    assert ensemble_id("u", list(reversed(members))) == result.id == ensemble_id("u", members)
    assert ensemble_id("u", members[:2]) != result.id
    moved = [dataclasses.replace(members[0], checkpoint="x/checkpoint_000009", checkpoint_epoch=9),
             *members[1:]]
    assert ensemble_id("u", moved) != result.id


@pytest.mark.parametrize("args, message", [
    (["nope", "--top", "2"], "no sweep named 'nope'"),
    (["fake", "--top", "0"], "--top 0: must be at least 1"),
    (["fake", "--top", "9"], "--top 9: sweep 'fake' has 4 trial(s) with a checkpoint to ensemble; "
                             "choose 1..4"),
    (["fake"], "give --top K"),
    (["fake", "--trials", "t0,zz"], "--trials 'zz': sweep 'fake' has no such trial"),
    (["fake", "--top", "2", "--where", "colour=red"],
     "'colour' is not 'outcome', 'status' or a trial setting"),
    (["fake", "--top", "2", "--where", "outcome"], "--where 'outcome' is not KEY=VALUE"),
    (["fake", "--trials", "t0,t3"], "members are trained on different datasets"),
    (["fake", "--top", "1", "--where", "outcome=pruned"],
     "--where outcome=pruned: no trial of sweep 'fake' has outcome=pruned (its trials have completed)"),
    # regressions: an empty --trials said "no trial to ensemble among trials " (nothing named); a
    # --where value no trial has did not say which values exist.
    (["fake", "--trials", ""], "--trials '' names no trial (trial ids or names, comma-separated"),
    (["fake", "--trials", ","], "--trials ',' names no trial"),
    (["fake", "--top", "1", "--where", "lr=7"],
     "--where optim.lr=7: no trial of sweep 'fake' has optim.lr=7 (its trials have 0.05, 0.02, 0.1)"),
    (["fake", "--top", "2", "--device", "cuda:7"], "--device cuda:7"),
    # regression: torch's list of 20 device types was the message
    (["fake", "--top", "2", "--device", "bogus"],
     "--device bogus: not a device (use auto, cpu, cuda or cuda:N)"),
])
def test_bad_inputs_exit_2_with_one_line(fake_sweep, args, message):
    root, _ = fake_sweep
    if args[-2:] == ["--device", "cuda:7"] and torch.cuda.is_available():
        pytest.skip("a CUDA machine may have device 7")
    code, output = _invoke("ensemble", *args, "--storage", str(root),
                           "--tracking-uri", f"sqlite:///{root / 'never.db'}")
    assert code == EXIT_USAGE, output
    assert message in " ".join(output.split()), output
    assert "Traceback" not in output
    assert not (root / "never.db").exists()  # refused before any tracking


def test_a_sweep_without_trials_is_refused(tmp_path):
    record = SweepRecord(tmp_path / "empty")
    record.create({"name": "empty", "sweep_uid": "u", "metric": "val_accuracy", "mode": "max"}, "")
    code, output = _invoke("ensemble", "empty", "--top", "1", "--storage", str(tmp_path))
    assert code == EXIT_USAGE, output
    assert "sweep 'empty' has no trials yet" in output and "Traceback" not in output


def test_no_checkpoints_is_refused(tmp_path):
    exp = tmp_path / "old"
    record = SweepRecord(exp)
    record.create({"name": "old", "sweep_uid": "u", "metric": "val_accuracy", "mode": "max"}, "")
    _write_trial(exp, record, "a", "x", {**BASE}, [{"epoch": 1, "val_accuracy": 0.5}], checkpoint=False)
    code, output = _invoke("ensemble", "old", "--top", "1", "--storage", str(tmp_path))
    assert code == EXIT_USAGE
    assert "sweep 'old' has no trial to ensemble (no checkpoint: x)" in " ".join(output.split())


def _parent_run(uri: str, sweep: str, sweep_uid: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(sweep) or None
    # Artifacts beside the test's own store: MLflow's default is ./mlruns in the working directory.
    artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    exp_id = exp.experiment_id if exp else client.create_experiment(sweep, artifact_location=artifacts)
    return client.create_run(exp_id, tags={"sweeper.sweep_uid": sweep_uid,
                                           "sweeper.role": "sweep"}).info.run_id


def test_logged_once_under_the_parent_run_and_never_twice(fake_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    from sweeper.ensemble import TrackingUnavailable

    root, record = fake_sweep
    uid = record.meta()["sweep_uid"]
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    members, words = select_members(record, sweep="fake", storage_root=str(root), top=2,
                                    where=["dataset=digits"])
    result = evaluate_ensemble(members, device="cpu", sweep="fake", sweep_uid=uid,
                               metric="val_accuracy", mode="max", selection=words)
    # No parent run there yet (the sweep's tracking never reached this store): said, not created.
    # The hint names the sweep's storage, as every other sync hint does: a bare `sweeper sync fake`
    # looks in ./sweeps and finds nothing.
    with pytest.raises(TrackingUnavailable, match="no parent run for sweep 'fake'") as err:
        log_ensemble(result, tracking_uri=uri, experiment="fake", storage=str(root))
    assert f"`sweeper sync fake --storage {root}`" in str(err.value), err.value
    parent = _parent_run(uri, "fake", uid)
    run_id, created = log_ensemble(result, tracking_uri=uri, experiment="fake")
    assert created
    assert log_ensemble(result, tracking_uri=uri, experiment="fake") == (run_id, False)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fake")
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("sweeper.role") == "ensemble"]
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
    assert run.data.tags["sweeper.ensemble_id"] == result.id
    assert run.data.tags["sweeper.members"] == ",".join(m.trial_id for m in members)
    assert run.data.params["ensemble.combine"] == "mean_softmax"
    assert run.data.metrics["test_accuracy"] == pytest.approx(
        _independent_accuracy(root, [m.trial_id for m in members], record), abs=1e-12)
    single = result.member_scores[members[0].trial_id]
    assert run.data.metrics["best_single_test_top1_error"] == single["top1_error"]
    assert run.data.metrics["gain_top5_error"] == pytest.approx(
        single["top5_error"] - result.ensemble["top5_error"])
    for key in ("test_top1_error", "test_top5_error", "best_single_test_accuracy",
                "best_single_test_top5_error", "gain_top1_error"):
        assert key in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"members.csv",
                                                                        "ensemble.json"}
    table = client.download_artifacts(run.info.run_id, "members.csv", str(tmp_path))
    lines = Path(table).read_text().splitlines()
    assert len(lines) == 1 + 2 + 1 and lines[-1].startswith("ensemble,")  # header, members, ensemble


def test_an_unreachable_tracking_server_is_exit_4_not_a_crash(fake_sweep, monkeypatch):
    from conftest import free_port

    root, _ = fake_sweep
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    url = f"http://127.0.0.1:{free_port()}"
    code, output = _invoke("ensemble", "fake", "--top", "1", "--storage", str(root),
                           "--tracking-uri", url)
    assert code == EXIT_UNDELIVERED, output
    text = " ".join(output.split())
    assert f"ensemble not logged to {url}" in text and "run this command again" in text
    assert "ensemble (mean of softmax, k=1)" in text  # the result was still shown
    assert "Traceback" not in output


# ---- a real sweep end to end --------------------------------------------------------------------

TINY = '''"""Three tiny trials for the ensemble test."""
from ray import tune
from sweeper.spaces import Sweep
SWEEP = Sweep(
    name="tiny",
    space={"model.arch": "vgg11", "model.width": 0.125, "data.name": "digits", "data.limit": 256,
           "model.batch_norm": True, "diagnostics.enabled": False,
           "optim.lr": tune.grid_search([0.01, 0.03, 0.1])},
    scheduler="fifo", max_epochs=2, seed=1,
)
'''


@pytest.mark.slow
@pytest.mark.ray
def test_ensemble_of_a_real_sweep_end_to_end(tmp_path):
    from mlflow.tracking import MlflowClient

    from conftest import run_sweeper

    space = tmp_path / "tiny.py"
    space.write_text(TINY)
    storage, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'ml.db'}"
    out = run_sweeper("launch", str(space), "--local", "--num-cpus", "2", "--storage", str(storage),
                      "--quiet", "--tracking-uri", uri, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = SweepRecord(storage / "tiny")

    out = run_sweeper("ensemble", "tiny", "--top", "2", "--storage", str(storage), "--device", "cpu",
                      timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ensemble (mean of softmax, k=2)" in out.stdout and "gain vs best single" in out.stdout

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("sweeper.role") == "sweep"][0]
    ens = [r for r in runs if r.data.tags.get("sweeper.role") == "ensemble"]
    assert len(ens) == 1 and ens[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    # the members: the two best trials by val_accuracy at their checkpoint epoch (= the last here)
    trials = sorted(record.trials(), key=lambda t: -t["last"]["val_accuracy"])
    top2 = [t["trial_id"] for t in trials[:2]]
    assert ens[0].data.tags["sweeper.members"].split(",") == top2
    assert all(t["checkpoint_epoch"] == 2 for t in trials)
    shutil.copytree(storage / "tiny", tmp_path / "view" / "fake")  # _independent_accuracy's layout
    expected = _independent_accuracy(tmp_path / "view", top2, SweepRecord(tmp_path / "view" / "fake"))
    assert ens[0].data.metrics["test_accuracy"] == pytest.approx(expected, abs=1e-12)
    # the member table links each member to its own trial run
    children = {r.data.tags.get("sweeper.trial_id"): r.info.run_id for r in runs
                if r.data.tags.get("sweeper.role") == "trial"}
    table = client.download_artifacts(ens[0].info.run_id, "members.csv", str(tmp_path))
    rows = [line.split(",") for line in Path(table).read_text().splitlines()]
    column = rows[0].index("mlflow_run_id")
    assert [r[column] for r in rows[1:3]] == [children[t] for t in top2]

    # Again, in-process (no second interpreter start): no second run.
    code, output = _invoke("ensemble", "tiny", "--top", "2", "--storage", str(storage))
    assert code == 0 and "already logged" in output, output
    runs = client.search_runs([exp.experiment_id])
    assert sum(r.data.tags.get("sweeper.role") == "ensemble" for r in runs) == 1
    code, output = _invoke("ensemble", "tiny", "--top", "4", "--storage", str(storage))
    assert code == EXIT_USAGE and "--top 4: sweep 'tiny' has 3 trial(s)" in output, output
    assert "Traceback" not in output


def test_a_torchvision_pretrained_member_is_evaluated_with_its_weights_normalisation():
    # Before: members were evaluated with the training split's mean/std even when the trial trained
    # on ImageNet-normalised inputs (model.pretrained = a torchvision name): silently other inputs.
    from sweeper.config import TrialConfig
    from sweeper.data import DeviceData, load_splits
    from sweeper.ensemble import member_test_probabilities, predict_probabilities
    from sweeper.models import build_model

    flat = {"data.name": "synthetic", "data.synthetic_size": 64, "data.resolution": 16,
            "model.arch": "resnet18", "model.batch_norm": True, "model.width": 0.125,
            "model.stem": "imagenet", "model.pretrained": "ResNet18_Weights.IMAGENET1K_V1",
            "device": "cpu"}
    cfg = TrialConfig.from_flat(flat)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10).eval()
    got, _, _ = member_test_probabilities({"config": flat, "model": model.state_dict()},
                                          device=torch.device("cpu"))
    splits = load_splits(cfg.data, seed=cfg.seed)
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    want, _ = predict_probabilities(model, DeviceData(splits, cfg.data, normalize=imagenet).eval_batches("test"))
    own, _ = predict_probabilities(model, DeviceData(splits, cfg.data).eval_batches("test"))
    assert not torch.allclose(want, own)  # the two normalisations do differ here
    assert torch.allclose(got, want, atol=1e-6)
