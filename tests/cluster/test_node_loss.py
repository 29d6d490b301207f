"""A worker node dies mid-trial (its raylet killed by pid): the trial resumes from its last checkpoint
on the storage, on a node that joined the cluster mid-sweep, and ends exactly where an uninterrupted
run of the same config ends (CPU, same seed).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from _cluster import AWS, cluster, pids_naming, s3  # noqa: F401 - fixtures
from sweeper.config import ConfigError, TrialConfig
from sweeper.local import existing_record
from sweeper.train import fit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = 10
CONFIG = {"model.arch": "smallcnn", "model.batch_norm": True, "data.name": "digits",
          "data.limit": 1024, "diagnostics.enabled": False, "optim.lr": 0.02, "seed": 0}
SPACE = f"""
\"\"\"One trial, long enough to lose its node mid-way.\"\"\"
from sweeper.spaces import Sweep
SWEEP = Sweep(name="node_loss", space={CONFIG!r}, scheduler="fifo", max_epochs={EPOCHS},
              max_failures=3, seed=0)
"""


def _trial_raylet(temp_dir: Path) -> int | None:
    """The raylet whose worker runs the trial: Tune's function trainable is a `ray::ImplicitFunc`
    actor, a child of its node's raylet."""
    for pid in pids_naming("ray::ImplicitFunc"):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if b"raylet" in parent.split(b"\0")[0] and str(temp_dir).encode() in parent:
            return ppid
    return None


def test_a_lost_worker_node_resumes_its_trial_from_the_checkpoint_on_a_new_node(cluster, s3, tmp_path,
                                                                          monkeypatch):
    storage, tracking = s3.uri(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = tmp_path / "node_loss.py"
    space.write_text(SPACE)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, **AWS, "SWEEPER_CACHE_DIR": str(tmp_path / "cache"),
           **{k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}}
    env.pop("RAY_ADDRESS", None)
    for key, value in AWS.items():  # this process reads the storage too
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path / "cache-reader"))
    driver = subprocess.Popen(
        [sys.executable, "-m", "sweeper.cli", "launch", str(space), "--address", cluster.address,
         "--storage", storage, "--tracking-uri", tracking, "--quiet"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Wait until the trial has checkpointed a few epochs on the storage, then kill its node.
        deadline, raylet, done = time.time() + 300, None, 0
        while time.time() < deadline:
            try:
                trials = existing_record("node_loss", storage).trials()
            except ConfigError:  # not on the storage yet
                trials = []
            done = max((t.get("epochs", 0) for t in trials), default=0)
            if done >= 3:
                raylet = _trial_raylet(cluster.temp_dir)
                if raylet:
                    break
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            time.sleep(1)
        assert raylet and done < EPOCHS, f"the trial never got going (epochs {done})"
        os.kill(raylet, signal.SIGKILL)  # the node is gone: raylet first, its workers follow
        cluster.add_worker()  # a node that joins mid-sweep
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, out.decode()[-3000:]

    record = existing_record("node_loss", storage)
    (trial,) = record.trials()
    assert trial["outcome"] in ("completed", "late_start") and trial["num_failures"] >= 1, trial
    # the user was told, in sweeper's own line, which trial, where it stopped, and what happens next
    told = [line for line in out.decode().splitlines() if "from its last checkpoint" in line]
    assert told and told[0].strip().startswith(f"{trial['name']}: failed after epoch"), out.decode()[-3000:]
    print("\n".join(told))
    epochs = record.epochs(trial["trial_id"])
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))  # none missing, none twice
    raw = [json.loads(line)["epoch"] for line in
           (record.trials_dir / f"{trial['trial_id']}.jsonl").read_text().splitlines()]
    assert raw.count(1) == 1, raw  # resumed from its checkpoint, not started again
    assert len({e["node_id"] for e in epochs}) >= 2  # it moved to another node
    client = MlflowClient(tracking)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("node_loss")
                                             .experiment_id]) if r.data.tags.get("sweeper.role") == "trial"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(1, EPOCHS + 1)), steps

    # The same result as a run that never lost its node: same seed, CPU, one thread as on the node.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = fit(TrialConfig.from_flat({**CONFIG, "epochs": EPOCHS}))
    finally:
        torch.set_num_threads(threads)
    for mine, ref in zip(epochs, alone.history):
        assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5, abs=1e-7)
        assert mine["val_accuracy"] == pytest.approx(ref["val_accuracy"], abs=1e-9)
