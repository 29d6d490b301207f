"""A real multi-node Ray cluster on this machine: a head that runs no trials and two worker nodes, each
its own `ray start` process tree and node id, token authentication on. Started and ended by this test
(by pid: every process of the cluster names the test's own --temp-dir on its command line).

What a user meets first on a cluster: the checks that need it run on the nodes trials run on, and a
problem there is one clear message naming the nodes, with nothing started and nothing written.
"""

import os
import re
import subprocess
import sys
import time

import pytest

from _cluster import cluster  # noqa: F401 - the fixture
from conftest import run_sweeper

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPACE = """
from sweeper.spaces import Sweep
SWEEP = Sweep(name="on_cluster", space={"model.arch": "smallcnn", "data.name": "cifar10",
              "diagnostics.enabled": False}, max_epochs=1)
"""


def test_cluster_checks_run_on_each_worker_node_and_refuse_with_nothing_written(cluster, tmp_path):
    address, env = cluster.address, cluster.env
    space = tmp_path / "space.py"
    space.write_text(SPACE)
    work = tmp_path / "work"
    work.mkdir()
    storage = f"file://{tmp_path / 'shared'}"  # a shared mount, as far as the nodes are concerned
    out = run_sweeper("launch", str(space), "--address", address, "--storage", storage,
                      "--data-dir", str(tmp_path / "no-data"),
                      env={k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}, cwd=work)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    first = out.stderr.strip().splitlines()[0]
    # Both worker nodes report it (the head runs no trials and is not asked).
    nodes = re.match(r"error: on node ((?:[\d.]+ \([0-9a-f]{8}\)(?:, )?)+): ", first)
    assert nodes and len(re.findall(r"\(([0-9a-f]{8})\)", nodes.group(1))) == 2, first
    assert "dataset 'cifar10' not found in" in first
    assert "Traceback" not in out.stderr
    assert list(work.iterdir()) == []  # no sweep record, no MLflow store
    assert not (tmp_path / "shared" / "on_cluster").exists()


def test_a_driver_without_the_clusters_token_gets_one_sentence(cluster, tmp_path):
    address, env = cluster.address, cluster.env
    space = tmp_path / "space.py"
    space.write_text(SPACE.replace('"cifar10"', '"digits"'))
    home = tmp_path / "home"  # no ~/.ray/auth_token here, and no RAY_AUTH_TOKEN
    home.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    clean["HOME"] = str(home)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "sweeper.cli", "launch", str(space), "--address",
                          address, "--storage", f"file://{tmp_path / 'shared'}"],
                         capture_output=True, text=True, timeout=300, env=clean, cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    first = out.stderr.strip().splitlines()[0]
    assert "needs its authentication token" in first and "~/.ray/auth_token" in first
    assert time.time() - t0 < 60  # not a minute of retries


def test_a_driver_with_the_wrong_token_gets_one_sentence(cluster, tmp_path):
    space = tmp_path / "space.py"
    space.write_text(SPACE.replace('"cifar10"', '"digits"'))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_TOKEN="0" * 64, HOME=str(tmp_path))  # a token, but not the cluster's
    out = subprocess.run([sys.executable, "-m", "sweeper.cli", "launch", str(space), "--address",
                          cluster.address, "--storage", f"file://{tmp_path / 'shared'}"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    ours = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    # the address answered (the launch checked), so the token is named, and where it came from
    assert len(ours) == 1 and ("it answered at that address, so it most likely refused the "
                               "authentication token this machine presented (the RAY_AUTH_TOKEN "
                               "variable)") in ours[0], out.stderr
    assert ours[0].startswith(f"error: could not connect to the Ray cluster at '{cluster.address}'")
    assert "Traceback" not in out.stderr
