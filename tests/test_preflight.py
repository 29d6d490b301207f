"""Pre-flight checks against a real two-node Ray cluster on this machine: problems that would
otherwise surface as an endless PENDING or a failed upload at the first checkpoint fail at once."""

import pytest
import ray
from ray import tune
from ray.cluster_utils import Cluster

from sweeper.spaces import Sweep
from sweeper.preflight import preflight

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # starts real (multi-node) Ray clusters


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _sweep(**kw):
    base = dict(name="pf", space={"model.arch": tune.grid_search(["vgg11", "vgg19"]),
                                  "model.width": 0.125, "data.name": "digits"})
    base.update(kw)
    return Sweep(**base)


def test_head_local_storage_is_rejected_on_a_multi_node_cluster(two_nodes, tmp_path):
    problems = preflight(_sweep(), root=str(tmp_path), gpu_available=False)
    assert len(problems) == 1
    assert "is a path on this machine, but the cluster has several nodes" in problems[0]
    assert "s3://" in problems[0]


def test_a_trial_no_node_can_hold_is_an_error_not_a_pending_trial(two_nodes):
    sweep = _sweep(resources=lambda cfg: {"cpu": 3 if cfg.model.arch == "vgg19" else 1})
    problems = preflight(sweep, root="s3://bucket/never-written?endpoint_override=http://127.0.0.1:9",
                         gpu_available=False)
    placement = [p for p in problems if "would wait PENDING forever" in p]
    assert len(placement) == 1
    assert "vgg19 asks for 3 CPU" in placement[0] and "largest: 2 CPU" in placement[0]


def test_a_fitting_sweep_on_shared_storage_passes(two_nodes, tmp_path):
    # file:// stands for a shared mount here: every node of this test cluster sees the same disk.
    problems = preflight(_sweep(storage=None), root=(tmp_path / "shared").as_uri(),
                         gpu_available=False)
    assert problems == []


@pytest.mark.parametrize("where", ["below", "outside", "absolute"])
def test_the_ray_job_command_a_ray_client_address_gets_names_the_file_where_the_job_runs(
        tmp_path, monkeypatch, where):
    # The job runs in the directory it uploads: `--working-dir .` with a file outside it (or an
    # absolute path of this machine) named a file the job would not find.
    import sys

    from sweeper.config import ConfigError
    from sweeper.preflight import _refuse_ray_client

    space = tmp_path / "spaces" / "mine.py"
    space.parent.mkdir()
    space.write_text("SWEEP = None\n")
    cwd = tmp_path if where != "outside" else tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    given = {"below": "spaces/mine.py", "outside": "../spaces/mine.py", "absolute": str(space)}[where]
    monkeypatch.setattr(sys, "argv", ["sweeper", "launch", given, "--address", "ray://h:10001", "x=1"])
    with pytest.raises(ConfigError) as err:
        _refuse_ray_client("ray://h:10001")
    command = str(err.value).splitlines()[-1].strip()
    if where == "outside":
        assert command == (f"ray job submit --address http://127.0.0.1:8265 --working-dir {space.parent} "
                           "-- sweeper launch mine.py x=1 --address auto")
    else:
        assert command == ("ray job submit --address http://127.0.0.1:8265 --working-dir . -- sweeper "
                           "launch spaces/mine.py x=1 --address auto")
