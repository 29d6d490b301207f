"""Every check a launch makes before a trial runs, each naming the field, the value and the fix.

Before Ray starts (the launch's ``_prepare``, and ``launch --dry-run`` through
:func:`dry_run_problems`): the command line's options (:func:`check_launch_options`), the storage (a
real write probe, removed again), the cluster address (reachable, and a Ray GCS rather than some other
server), a relaunch whose space changed, and, for a fresh local Ray, this machine's CPUs/GPUs and
datasets. Once connected to a cluster (:func:`preflight`): placement on its nodes, shared storage, and
one small Ray task per node (:func:`check_node`) that checks storage, datasets, weight files and GPUs
where the trials will run. Nothing here starts or configures Ray: that is :mod:`sweeper.tuner`'s.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from sweeper.config import ConfigError, TrialConfig
from sweeper.console import fmt
from sweeper.records import SweepRecord
from sweeper.spaces import Sweep, grid_cells, trial_resources
from sweeper.store import filesystem, redacted_root, resume_command, storage_error, storage_root
from sweeper.tracking import check_tracking_uri

__all__ = ["check_launch_options", "check_node", "default_store_problems", "dry_run_problems", "preflight",
           "sweep_path_problems"]


# ---- the command line -------------------------------------------------------------------------------


def check_launch_options(*, address: str | None, local: bool, num_cpus: int | None,
                         tracking_uri: str | None = None) -> None:
    """The command line's options that contradict each other, name no machine or a tracking store
    that cannot work: refused before anything else, `launch --dry-run` included."""
    if local and address:
        raise ConfigError([f"--local starts a fresh Ray on this machine and --address {address} "
                           "connects to a cluster: pass one of them"])
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError([f"--num-cpus {num_cpus}: the local Ray needs at least 1 CPU "
                           "(leave it out to use all of this machine's)"])
    if tracking_uri:  # MLFLOW_TRACKING_URI is used only without it (see tuner._run)
        check_tracking_uri(tracking_uri)
    else:
        check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"), option="MLFLOW_TRACKING_URI")


def dry_run_problems(sweep: Sweep, *, local: bool, num_cpus: int | None) -> list[str]:
    """What the launch would refuse before Ray starts, asked without starting or leaving anything:
    for ``--dry-run``, which once printed a plan for storage that was a file, for 100 CPUs on a
    2-core machine or for a dataset that was not there.

    Storage is probed where it is a path on this machine (a plain path or a file:// URI); other URIs
    need their server, which the launch reaches. The trials' CPUs/GPUs and datasets are this
    machine's to check only with ``--local``: a cluster's are checked on its nodes at launch.
    Weight files (model.pretrained / init_from) are not read, so that a study can be planned before
    the sweep it fine-tunes from has run.
    """
    root = storage_root(sweep.storage)
    problems = _machine_problems(sweep, num_cpus) if local else []
    return (problems + sweep_path_problems(root, sweep.name) + default_store_problems(sweep.storage)
            + (_probe_storage(root) if _local_path(root) is not None else []))


def default_store_problems(storage: str | None, tracking_uri: str | None = None) -> list[str]:
    """The embedded MLflow store beside the sweeps, when no other is given: a file there that is not
    an SQLite database (a sweep once trained, then retried delivery to it for ever)."""
    from sweeper.store import record_root
    from sweeper.tracking import default_tracking_uri

    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return []  # checked as given (check_launch_options)
    root = record_root(storage)
    if not (Path(root) / "mlflow.db").exists():
        return []  # made by the launch; an unwritable storage is the storage check's to name
    try:
        check_tracking_uri(default_tracking_uri(root), option="the MLflow store")
    except ConfigError as exc:
        return exc.problems
    return []


def sweep_path_problems(root: str, name: str) -> list[str]:
    """The sweep's directory on a local storage is taken by a file (the launch once ended in a
    NotADirectoryError traceback there, while --dry-run passed)."""
    path = _local_path(root)
    if path is None:
        return []
    where = path / name
    # The record's own folder too (SweepRecord.dir): a file there, in a folder another tool owns,
    # ended the launch in a FileExistsError traceback.
    for taken in (where, SweepRecord(where).dir):  # outermost first: a missing one ends the check
        if not taken.exists():
            break
        if not taken.is_dir():
            return [f"name={name!r}: {taken} is a file, not a sweep's directory: give the sweep "
                    "another name (--name NEW) or another --storage, or move the file"]
    return []


# ---- storage ----------------------------------------------------------------------------------------


def _check_storage(root: str, *, multi_node: bool) -> list[str]:
    problems = []
    if "://" not in root and multi_node:
        problems.append(
            f"storage={root!r} is a path on this machine, but the cluster has several nodes: remote "
            "workers cannot write checkpoints there. Use shared storage (s3://bucket/path, "
            "gs://..., or an NFS mount present on every node, given as file:///mnt/...)")
        return problems
    try:
        fs, path = filesystem(root if "://" in root else Path(root).as_uri())
        fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/.sweeper-write-test-{os.getpid()}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:  # pyarrow raises OSError subclasses and ArrowInvalid
        problems.append(f"storage={redacted_root(root)!r} is not writable: {storage_error(exc)}")
    return problems


def _local_path(root: str) -> Path | None:
    if "://" not in root:
        return Path(root)
    if root.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(root).path))
    return None


def _probe_storage(root: str) -> list[str]:
    """The storage write probe, removing the directories it made (a refusal writes nothing, and a
    launch that fails later removes what it made with its record)."""
    path = _local_path(root)
    created = _dirs_to_create(path) if path is not None else []
    try:
        return _check_storage(root, multi_node=False)
    finally:
        _remove_created(created)


def _dirs_to_create(*paths: Path) -> list[Path]:
    """The missing ones among paths and their parents, outermost first (to undo a failed start)."""
    missing: list[Path] = []
    for path in paths:
        for p in [*reversed(path.parents), path]:
            if not p.exists() and p not in missing:
                missing.append(p)
    return missing


def _remove_created(created: list[Path]) -> None:
    import shutil

    for path in created:  # outermost first: one rmtree removes the rest
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            return


# ---- this machine, for a fresh local Ray ------------------------------------------------------------


def _local_capacity(num_cpus: int | None) -> list[dict[str, float]]:
    """What a fresh local Ray will offer, known before starting it."""
    import torch

    return [{"cpu": float(num_cpus or os.cpu_count() or 1),
             "gpu": float(torch.cuda.device_count() if torch.cuda.is_available() else 0)}]


def _machine_problems(sweep: Sweep, num_cpus: int | None) -> list[str]:
    """A local launch's trials that this machine could never place, and datasets it lacks."""
    capacity = _local_capacity(num_cpus)
    return (_resource_problems(sweep, capacity, gpu_available=bool(capacity[0]["gpu"]))
            + _data_problems(sweep))


# ---- what the trials need: placement and datasets ---------------------------------------------------


def _configs_to_check(sweep: Sweep) -> list[TrialConfig]:
    """One config per grid cell (sampled elsewhere): resources and datasets may differ by cell."""
    from sweeper.spaces import base_config, sample_config

    sampled = sample_config(sweep)
    configs = []
    for cell in grid_cells(sweep):
        configs.append(TrialConfig.from_flat({**sampled, **base_config(sweep, cell)}))
    return configs


def _resource_problems(sweep: Sweep, capacity: list[dict[str, float]], *,
                       gpu_available: bool) -> list[str]:
    """Trials that no node could ever place (they would wait PENDING forever)."""
    problems, seen = [], set()
    for cfg in _configs_to_check(sweep):
        if cfg.device.startswith("cuda") and not gpu_available:
            problem = (f"device={cfg.device!r}: trials of {cfg.model.arch} must run on a GPU, but "
                       "this Ray cluster has none: use device='auto' (the GPU where there is one)")
            if problem not in problems:
                problems.append(problem)
            continue
        need = trial_resources(sweep, cfg)
        if not gpu_available:
            need["gpu"] = 0.0
        key = (need["cpu"], need["gpu"])
        if key in seen:
            continue
        seen.add(key)
        if not any(c["cpu"] >= need["cpu"] and c["gpu"] >= need["gpu"] for c in capacity):
            biggest = max(capacity, key=lambda c: (c["gpu"], c["cpu"]), default={"cpu": 0, "gpu": 0})
            problems.append(
                f"resources: a trial of {cfg.model.arch} asks for {fmt(need['cpu'])} CPU and "
                f"{fmt(need['gpu'])} GPU, but no node has that much (largest: "
                f"{fmt(biggest['cpu'])} CPU, {fmt(biggest['gpu'])} GPU): it would wait PENDING "
                "forever. Lower `resources`, or add nodes")
    return problems


def _dataset_configs(sweep: Sweep) -> list[dict[str, Any]]:
    """One flat config per distinct dataset the grid names (name, directory, resolution)."""
    configs, seen = [], set()
    for cfg in _configs_to_check(sweep):
        key = (cfg.data.name, cfg.data.dir, cfg.data.resolution)
        if key not in seen:
            seen.add(key)
            configs.append(cfg.to_flat())
    return configs


def _dataset_problems(data_configs: list[dict[str, Any]]) -> list[str]:
    """Each dataset is present (decoded once into this node's cache), else why not."""
    from sweeper.data import DatasetUnavailable, load_splits

    problems = []
    for flat in data_configs:
        cfg = TrialConfig.from_flat(flat)
        try:
            load_splits(cfg.data, seed=cfg.seed)
        except DatasetUnavailable as exc:
            problems.append(str(exc))
    return problems


def _data_problems(sweep: Sweep) -> list[str]:
    """Every dataset the grid names is present on this machine."""
    return _dataset_problems(_dataset_configs(sweep))


# ---- the cluster address ----------------------------------------------------------------------------


def _refuse_ray_client(address: str | None) -> None:
    """Ray Client (ray://) runs Tune's controller on the head: the driver callback, ASHA's decisions
    and the tracking spool would write there, while status/report/export read this machine. A Ray job
    runs the whole driver on the head instead, and survives this machine going away."""
    import shlex
    import sys

    address = address or os.environ.get("RAY_ADDRESS")
    if not address or not address.startswith("ray://"):
        return
    host = address[len("ray://"):].rsplit(":", 1)[0] or "HEAD"
    argv, args, skip = list(sys.argv[1:]), [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--address":
            skip = True
            continue
        if not arg.startswith("--address="):
            args.append(arg)
    if not args or args[0] not in ("launch", "resume"):
        args = ["launch", "FILE"]
    # The job runs in the directory it uploads: the space file is named relative to it, and one
    # outside this directory has its own folder uploaded (an absolute path here is no path there).
    working_dir = "."
    for i, arg in enumerate(args[1:], start=1):
        if args[0] == "launch" and not arg.startswith("-") and Path(arg).is_file():
            file = Path(arg).resolve()
            try:
                args[i] = str(file.relative_to(Path.cwd().resolve()))
            except ValueError:
                working_dir, args[i] = str(file.parent), file.name
            break
    command = (f"ray job submit --address http://127.0.0.1:8265 --working-dir {shlex.quote(working_dir)}"
               " -- sweeper " + " ".join(shlex.quote(a) for a in args) + " --address auto")
    raise ConfigError([
        f"--address {address}: Ray Client (ray://) would run the sweep's controller on the head "
        f"({host}) while its record stays here, so status, report and resume would not see it. "
        f"Submit the sweep as a Ray job (through an SSH tunnel or port-forward to the head's "
        f"dashboard port 8265; never expose it):\n  {command}"])


_REACH_S = 5.0  # seconds to open a TCP connection to the cluster before Ray's own minutes of retries


_GCS_PORT = "the head node's GCS port, 6379 unless `ray start --head --port` said otherwise"


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT cluster address answers a TCP connection within a few seconds, and not as some
    other kind of server (see :func:`_first_reply`), or the launch stops here naming the address and
    the reason: Ray's connection retries take minutes to fail. 'auto' (this node's running Ray) is
    left to Ray; 'local' and URLs other than ray:// (refused before this) are refused."""
    import socket

    option = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "auto" or address.startswith("ray://"):  # ray:// is refused above
        return
    if address == "local":
        raise ConfigError([f"{option} local would start a fresh Ray on this machine: that is --local "
                           "(with --num-cpus to size it)"])
    if "://" in address:
        raise ConfigError([f"{option} {address!r} is a URL, not a cluster address: give HOST:PORT "
                           f"({_GCS_PORT}); an http:// address is the dashboard's, for `ray job submit`"])
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host  # [IPv6]:port
    if not sep or not host or (":" in host and not bracketed) or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ConfigError([f"{option} {address!r} is not a cluster address: give the head node's "
                           f"HOST:PORT ({_GCS_PORT}), or 'auto' on a node of the cluster"])
    try:
        with socket.create_connection((host, int(port)), timeout=_REACH_S) as conn:
            reply = _first_reply(conn)
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConfigError([f"could not reach the Ray cluster at {address!r} ({option}): {why} "
                           f"within {_REACH_S:g} s. Is its head node up (`ray start --head` there), "
                           f"and is port {port} open from this machine?"]) from None
    if reply and not (len(reply) >= 4 and reply[3] == 0x04):  # anything but an HTTP/2 SETTINGS frame
        raise ConfigError([f"{option} {address!r} answers, but not as Ray's GCS (a gRPC server; it "
                           f"replied {reply[:12]!r}): give {_GCS_PORT}, not e.g. the dashboard's (8265)"])


def _first_reply(conn) -> bytes:
    """The first bytes a server sends after an HTTP/2 connection preface and an empty SETTINGS frame
    (RFC 9113 3.4): a gRPC server such as Ray's GCS answers with its own SETTINGS frame (its 4th
    byte, the frame type, is 4), a web server with an error page or status line. Empty when it says
    nothing within a second or closes (a TLS endpoint, say): then Ray decides. Ray's connection
    retries take minutes to give up on a port that accepts connections but is not a GCS (seen: over
    150 s against a web server)."""
    try:
        conn.settimeout(1.0)
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        return conn.recv(16)
    except OSError:  # socket.timeout is an OSError
        return b""


# ---- a sweep that exists ----------------------------------------------------------------------------


def _check_space_unchanged(sweep: Sweep, record: SweepRecord) -> None:
    """A sweep name is bound to its space: relaunching a changed one would run neither."""
    from sweeper.spaces import space_signature

    saved = record.meta().get("signature")
    if saved is None:  # a sweep launched before signatures were recorded
        return
    now = space_signature(sweep)
    if now == saved:
        return
    lines = []
    for key in sorted(set(saved) | set(now)):
        if key not in now:
            lines.append(f"  - {key}: {saved[key]} (removed)")
        elif key not in saved:
            lines.append(f"  + {key}: {now[key]} (new)")
        elif saved[key] != now[key]:
            lines.append(f"  ~ {key}: {saved[key]} -> {now[key]}")
    raise ConfigError([
        f"sweep {sweep.name!r} already exists with a different space, and a relaunch would "
        "resume the old one without running the new trials:\n" + "\n".join(lines) + "\n"
        f"  Launch the new space under another name (--name {sweep.name}-v2), "
        f"or continue the old one as launched "
        f"({resume_command(sweep.name, sweep.storage, cluster=record.meta().get('cluster'))})"])


def _refuse_a_second_sweep_of_the_name(name: str, root: str) -> None:
    """No --storage, and this machine launched a sweep of this name on another local storage that
    still holds it: a new sweep here would take the name over (status, report and resume would find
    it, not that one). ``status NAME`` finds sweeps the same way (``local.resolve_storage``)."""
    from sweeper.store import index_lookup, is_uri

    elsewhere = index_lookup(name)
    if not elsewhere or is_uri(elsewhere) or elsewhere == root:
        return
    if SweepRecord(Path(elsewhere) / name).exists():
        raise ConfigError([f"a sweep named {name!r} already lives in {elsewhere} (launched from this "
                           f"machine): pass --storage {shlex.quote(elsewhere)} to resume it, --name "
                           f"to start another, or --storage {shlex.quote(root)} to start a second "
                           f"{name!r} here"])


# ---- on the cluster, once connected -----------------------------------------------------------------


def preflight(sweep: Sweep, *, root: str, gpu_available: bool, local: bool = False) -> list[str]:
    """The checks that need the cluster: placement on its nodes, shared storage, data. Problems.

    On a cluster, storage, data and GPUs are checked where trials run: one small Ray task pinned to
    each node that can run trials. For a fresh local Ray they were checked before it started
    (``_prepare``): the node is this machine.
    """
    import ray  # the driver's connected Ray; no module but the tuner starts one

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    capacity = [{"cpu": n["Resources"].get("CPU", 0.0), "gpu": n["Resources"].get("GPU", 0.0)}
                for n in nodes]
    problems = _resource_problems(sweep, capacity, gpu_available=gpu_available)
    if not local:
        problems += _check_storage(root, multi_node=len(nodes) > 1)
        if not problems:
            problems += _node_problems(sweep, root, nodes)
    return problems


def check_node(root: str, data_configs: list[dict[str, Any]], expect_gpu: bool,
               sources: list[tuple[str, str]] = ()) -> list[str]:
    """Run on one node: can it write the storage, load every dataset, read every pretrained or
    init_from source, see its GPUs?"""
    from sweeper.transfer import unreadable_sources

    problems = (_check_storage(root, multi_node=False) + _dataset_problems(data_configs)
                + unreadable_sources(list(sources)))
    if expect_gpu:
        import torch

        if not torch.cuda.is_available():
            problems.append("Ray lists GPUs on this node, but torch sees none (a CPU-only torch, "
                            "or a driver that does not match the CUDA torch was built for)")
    return problems


def _node_problems(sweep: Sweep, root: str, nodes: list[dict[str, Any]]) -> list[str]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from sweeper.transfer import source_files

    data_configs = _dataset_configs(sweep)
    sources = source_files(sweep)
    workers = [n for n in nodes if n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0)]
    task = ray.remote(num_cpus=0)(check_node)
    refs = {n["NodeManagerAddress"] + (f" ({n['NodeID'][:8]})" if len(workers) > 1 else ""):
            task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(root, data_configs, bool(n["Resources"].get("GPU", 0)), sources)
            for n in workers}
    by_problem: dict[str, list[str]] = {}
    for where, ref in refs.items():
        for problem in ray.get(ref, timeout=600):
            by_problem.setdefault(problem, []).append(where)
    return [f"on node {', '.join(where)}: {problem}" for problem, where in by_problem.items()]
