"""Reliability: a diverged trial is an outcome, a changed space is refused, a lost checkpoint restarts
its trial, one driver per sweep (a lease, never a bare pid), and the exit codes scripts rely on.

The lease tests use real processes (stand-ins for a driver, started and ended here by pid); the sweep
tests drive the real CLI with its own local Ray.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_sweeper
from sweeper.lease import (HEARTBEAT_S, DriverLease, LeaseHeld, LeaseInfo, clean_orphans, died_holding,
                           process_start_time, read_lease, request_stop)
from sweeper.records import SweepRecord
from sweeper.trial import with_metric, worst_value


# ---- the metric of a diverged epoch -----------------------------------------------------------------


def test_a_diverged_report_carries_the_worst_value_for_the_mode():
    diverged = {"epoch": 1, "train_loss": float("nan"), "outcome": "diverged"}
    assert with_metric(diverged, "val_accuracy", "max")["val_accuracy"] == 0.0
    assert with_metric(diverged, "val_loss", "min")["val_loss"] == float("inf")
    assert with_metric(diverged, "val_top1_error", "min")["val_top1_error"] == 1.0
    assert with_metric({"val_loss": float("nan")}, "val_loss", "min")["val_loss"] == float("inf")
    healthy = {"val_accuracy": 0.5}
    assert with_metric(healthy, "val_accuracy", "max") is healthy  # a real value is never touched
    assert worst_value("train_loss", "max") == float("-inf")


# ---- the lease ----------------------------------------------------------------------------------------


def _stand_in() -> subprocess.Popen:
    """A process that is not a driver: the pid a crashed driver's lease may point at after reuse."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])


def _write_lease(record_dir: Path, pid: int, start_time: str | None, *, host=None, heartbeat=None,
                 session_dir=None) -> None:
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / "driver.json").write_text(json.dumps({
        "pid": pid, "host": host or socket.gethostname(), "start_time": start_time,
        "started": time.time() - 100, "heartbeat": heartbeat or time.time(),
        "session_dir": session_dir}))


def _fake_sweep(storage: Path, name: str) -> SweepRecord:
    record = SweepRecord(storage / name)
    record.create({"name": name, "metric": "val_accuracy", "mode": "max", "planned_trials": 2},
                  "SWEEP = None\n")
    record.write_trial("t1", {"trial_id": "t1", "name": "a", "config": {"optim.lr": 0.1},
                              "status": "running", "epochs": 1, "created": 1.0})
    return record


def test_a_reused_pid_is_not_the_driver_and_stop_never_signals_it(tmp_path):
    record = _fake_sweep(tmp_path, "stale")
    stand_in = _stand_in()
    try:
        # The driver died; its pid now belongs to another process (another start time).
        _write_lease(record.dir, stand_in.pid, start_time="1")
        info = read_lease(record.dir)
        assert info is not None and not info.alive
        status = run_sweeper("status", "stale", "--storage", str(tmp_path))
        assert status.returncode == 0, status.stderr
        assert "not running: its driver (pid" in status.stdout and "died" in status.stdout
        assert "interrupted" in status.stdout  # its trial is not shown running forever
        stop = run_sweeper("stop", "stale", "--storage", str(tmp_path))
        assert stop.returncode == 0, stop.stderr
        assert "is not running" in stop.stdout
        assert not (record.dir / "stop_request.json").exists()
        time.sleep(0.5)
        assert stand_in.poll() is None  # never signalled
    finally:
        stand_in.kill()
        stand_in.wait()


def test_after_a_killed_driver_status_export_and_report_say_the_same_of_its_running_trial(tmp_path):
    """Before `sweeper sync`, status said "interrupted", export "running" with no outcome and the
    report "1 running ... still running" about the same trial of a killed driver."""
    import csv

    record = _fake_sweep(tmp_path, "gone")
    record.write_trial("t2", {"trial_id": "t2", "name": "b", "config": {"optim.lr": 0.01},
                              "status": "finished", "outcome": "completed", "epochs": 1, "created": 2.0})
    stand_in = _stand_in()
    try:
        _write_lease(record.dir, stand_in.pid, start_time="1")  # its pid is now another process's
        status = run_sweeper("status", "gone", "--storage", str(tmp_path))
        export = run_sweeper("export", "gone", "--storage", str(tmp_path), "-o", str(tmp_path / "t.csv"))
        report = run_sweeper("report", "gone", "--storage", str(tmp_path), "--out", str(tmp_path / "r"))
    finally:
        stand_in.kill()
        stand_in.wait()
    for out in (status, export, report):
        assert out.returncode == 0, out.stdout + out.stderr
        text = " ".join((out.stdout + out.stderr).split())
        assert ("1 trial(s) were running when the driver died (interrupted): shown as stopped, as "
                f"`sweeper sync gone --storage {tmp_path}` labels them") in text, text
    assert "1 completed, 1 stopped" in " ".join(status.stdout.split())
    rows = {r["trial_id"]: r for r in csv.DictReader((tmp_path / "t.csv").open())}
    assert (rows["t1"]["status"], rows["t1"]["outcome"], rows["t2"]["outcome"]) == ("stopped", "stopped",
                                                                                    "completed")
    summary = " ".join(report.stdout.split())
    assert "1 stopped" in summary and "1 running" not in summary and "still running" not in summary, summary
    assert record.trial("t1")["status"] == "running"  # readers never write: sync labels the record


def test_a_live_driver_is_asked_to_stop_through_the_record_not_signalled(tmp_path):
    record = _fake_sweep(tmp_path, "live")
    stand_in = _stand_in()
    try:
        _write_lease(record.dir, stand_in.pid, start_time=process_start_time(stand_in.pid))
        status = run_sweeper("status", "live", "--storage", str(tmp_path))
        assert f"running (driver pid {stand_in.pid} on {socket.gethostname()}" in status.stdout
        stop = run_sweeper("stop", "live", "--storage", str(tmp_path))
        assert stop.returncode == 0 and "asked sweep 'live'" in stop.stdout, stop.stdout
        assert (record.dir / "stop_request.json").is_file()
        time.sleep(0.5)
        assert stand_in.poll() is None  # the request is for the driver's heartbeat to act on
    finally:
        stand_in.kill()
        stand_in.wait()


def test_a_second_launch_is_refused_while_the_driver_lives(tmp_path):
    space = tmp_path / "space.py"
    space.write_text(textwrap.dedent("""
        from sweeper.spaces import Sweep
        SWEEP = Sweep(name="busy", space={"model.arch": "smallcnn", "data.name": "digits"},
                      max_epochs=1)
    """))
    record = _fake_sweep(tmp_path / "store", "busy")
    stand_in = _stand_in()
    sessions = set(Path("/tmp/ray").glob("session_2*")) if Path("/tmp/ray").is_dir() else set()
    try:
        _write_lease(record.dir, stand_in.pid, start_time=process_start_time(stand_in.pid))
        out = run_sweeper("launch", str(space), "--local", "--storage", str(tmp_path / "store"))
        assert out.returncode == 2, out.stdout + out.stderr
        first = out.stderr.strip().splitlines()[0]
        assert "sweep 'busy' is already running" in first and f"pid {stand_in.pid}" in first
        assert read_lease(record.dir).pid == stand_in.pid  # the lease is untouched
        after = set(Path("/tmp/ray").glob("session_2*")) if Path("/tmp/ray").is_dir() else set()
        assert after == sessions  # refused before any Ray started
    finally:
        stand_in.kill()
        stand_in.wait()


def test_a_lease_is_taken_over_only_from_a_dead_driver(tmp_path):
    stand_in = _stand_in()
    try:
        _write_lease(tmp_path, stand_in.pid, start_time=process_start_time(stand_in.pid))
        with pytest.raises(LeaseHeld):
            DriverLease(tmp_path).claim()
        # A remote driver counts as alive while its heartbeat is fresh, dead once it is stale.
        _write_lease(tmp_path, 1, None, host="elsewhere", heartbeat=time.time())
        with pytest.raises(LeaseHeld):
            DriverLease(tmp_path).claim()
        _write_lease(tmp_path, 1, None, host="elsewhere", heartbeat=time.time() - 3600)
        lease = DriverLease(tmp_path).claim()
        try:
            assert lease.previous is not None and lease.previous.host == "elsewhere"
            mine = read_lease(tmp_path)
            assert mine.pid == os.getpid() and mine.alive
        finally:
            lease.release()
        assert read_lease(tmp_path) is None
    finally:
        stand_in.kill()
        stand_in.wait()


@pytest.mark.parametrize("started_ignoring_sigint", [False, True])
def test_a_stop_request_interrupts_the_driver_through_its_heartbeat(tmp_path, started_ignoring_sigint):
    """A driver started in the background of a script inherits SIGINT ignored (POSIX shells do that
    to `cmd &`); the request then waits until a handler is installed -- Tune installs its own for the
    run -- instead of being lost in a signal nobody hears."""
    script = textwrap.dedent(f"""
        import signal, sys, time
        from sweeper.lease import DriverLease
        signal.signal(signal.SIGINT, signal.SIG_IGN if {started_ignoring_sigint} else signal.default_int_handler)
        lease = DriverLease({str(tmp_path)!r}).claim()
        print("claimed", flush=True)
        try:
            if {started_ignoring_sigint}:
                sys.stdin.readline()  # the test says when "Tune" starts
                signal.signal(signal.SIGINT, signal.default_int_handler)
                print("handler", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:  # what Tune sees on SIGINT: save state, return
            lease.release()
            sys.exit(3)
        sys.exit(0)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "claimed"
        assert request_stop(tmp_path).pid == driver.pid
        if started_ignoring_sigint:
            with pytest.raises(subprocess.TimeoutExpired):
                driver.wait(timeout=3 * HEARTBEAT_S)  # several beats: nothing can be delivered yet
            driver.stdin.write("go\n")
            driver.stdin.flush()
            assert driver.stdout.readline().strip() == "handler"
        assert driver.wait(timeout=30) == 3
        assert read_lease(tmp_path) is None and not (tmp_path / "stop_request.json").exists()
    finally:
        if driver.poll() is None:
            driver.kill()


def test_sigterm_goes_to_tunes_handler_during_a_run_and_is_a_ctrl_c_around_it():
    """During fit, SIGTERM goes to Tune's SIGINT handler (save the state, return); before fit it is a
    KeyboardInterrupt, as Ctrl-C is, even where SIGINT is ignored (a backgrounded launch); after fit
    the first lets the sweep finish, hurried, and a second is a KeyboardInterrupt. The handler it
    replaced (Ray's) is back afterwards. Real signals to this very process."""
    from sweeper.interrupts import SigtermStops

    seen = []
    before = signal.signal(signal.SIGTERM, lambda *_: seen.append("previous"))
    old_int = signal.getsignal(signal.SIGINT)
    sigterm = SigtermStops()
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))  # "Tune's"
        sigterm.install()
        assert not sigterm.hurry
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # a Python handler runs between bytecodes of the main thread
        assert seen == [signal.SIGINT] and sigterm.hurry
        for on_sigint in (signal.default_int_handler, signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(signal.SIGINT, on_sigint)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        fresh = SigtermStops()  # after fit: the first goes by, the second interrupts
        sigterm.uninstall()
        fresh.install()
        fresh.fit_over()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert fresh.hurry
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        fresh.uninstall()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert seen == [signal.SIGINT, "previous"]
        assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd is given back too
    finally:
        sigterm.uninstall()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, before)


_STUCK_DRIVER = """
import os, signal, subprocess, sys, time
from sweeper import interrupts
interrupts.GRACE_S = float(sys.argv[2])
ray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],  # "Ray's"
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
stops = interrupts.SigtermStops()
stops.install((ray.pid,) if sys.argv[1] == "ray" else ())
stops.cut_short = lambda delivering: print("runs ended, delivering:", delivering, flush=True)
stops.first.append(lambda: print("lease released", flush=True))
stops.then += [lambda: print("delivered", flush=True), lambda: print("record pushed", flush=True)]
signal.signal(signal.SIGINT, lambda *_: print("tune asked to stop", flush=True))
# Stuck as the driver is in Ray's wait on a dead cluster: Python runs no handler in the main thread
# (here: SIGTERM blocked in it, so another thread takes the signal; only the wakeup fd hears it).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
print("ready", ray.pid, flush=True)
sys.stdin.readline()  # for ever: the test never writes
"""


@pytest.mark.parametrize("how", ["ray", "deadline"])
def test_a_driver_stuck_after_a_sigterm_ends_itself_and_exits_3(tmp_path, how):
    """From the first SIGTERM a watchdog ends a launch whose local Ray died with the signal (a
    process-group SIGTERM: `timeout`, a batch job step) at once, or one still running after the
    grace period: the record and runs, then the lease, then (Ray alive) the delivery and the
    record's push, then exit 3.
    It hears the signal through the wakeup fd even while the main thread cannot run a handler."""
    script = tmp_path / "stuck.py"
    script.write_text(_STUCK_DRIVER)
    grace = "60" if how == "ray" else "1.5"
    driver = subprocess.Popen([sys.executable, str(script), how, grace], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ray_pid = None
    try:
        ready, ray_pid = driver.stdout.readline().split()
        assert ready == "ready"
        started = time.monotonic()
        driver.send_signal(signal.SIGTERM)
        if how == "ray":
            time.sleep(0.5)
            os.kill(int(ray_pid), signal.SIGKILL)  # its Ray went with the signal (a zombie of its)
        out = driver.stdout.read()
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
        if ray_pid is not None:
            try:
                os.kill(int(ray_pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    took = time.monotonic() - started
    assert driver.returncode == 3, out
    lines = [line for line in out.splitlines() if line.strip()]
    why = ("Ray's processes on this machine ended with the SIGTERM" if how == "ray"
           else "the launch was still running 2 s after the SIGTERM")
    assert why in lines[0], out
    # With its Ray gone, Ray's core worker ends the process within a second (exit 1): only the quick
    # steps, the delivery left to `sweeper sync`; stuck on a live Ray, everything.
    assert lines[1:] == (["runs ended, delivering: False", "lease released"] if how == "ray" else
                         ["runs ended, delivering: True", "lease released", "delivered",
                          "record pushed"]), out
    assert "tune asked to stop" not in out  # the main thread never ran a handler
    assert took < (10 if how == "ray" else 12), took


@pytest.mark.ray
def test_sigterm_is_still_heard_after_ray_shutdown_put_its_default_action_back(tmp_path):
    """ray.shutdown() (ray 2.60) restores SIGTERM's default action under Python's handler table: a
    SIGTERM while the report ran killed the driver (143). ``reinstall`` after the shutdown."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        import ray
        from sweeper.interrupts import SigtermStops
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        stops = SigtermStops()
        stops.install()
        stops.fit_over()
        ray.shutdown()
        if sys.argv[1] == "reinstall":
            stops.reinstall()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        print("heard", stops.hurry, flush=True)
        stops.uninstall()
    """)
    for how, expected in (("reinstall", 0), ("not", -signal.SIGTERM)):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == expected, (how, done.stdout, done.stderr[-2000:])
        assert ("heard True" in done.stdout) == (how == "reinstall"), done.stdout


def test_orphans_of_a_dead_drivers_ray_are_ended_and_nothing_else(tmp_path):
    session = f"/tmp/ray/session_test_{uuid.uuid4().hex}"
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                               f"--session-dir={session}"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                                  f"--session-dir={session}-other"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        alive_driver = LeaseInfo(pid=os.getpid(), host=socket.gethostname(),
                                 start_time=process_start_time(os.getpid()), started=0,
                                 heartbeat=time.time(), session_dir=session)
        assert clean_orphans(alive_driver) == []  # a live driver's Ray is never touched
        dead_driver = LeaseInfo(pid=dead.pid, host=socket.gethostname(), start_time="1",
                                started=0, heartbeat=0, session_dir=session)
        assert clean_orphans(dead_driver) == [orphan.pid]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (orphan, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()


# ---- sweeps through Ray ---------------------------------------------------------------------------

NAN_SPACE = """
from ray import tune
from sweeper.spaces import Sweep
SWEEP = Sweep(
    name="nan",
    space={
        "model.arch": "smallcnn", "data.name": "digits", "data.limit": 256,
        "diagnostics.enabled": False,
        # 1e4 and 1e6 are far past what SGD on this net survives: non-finite loss in epoch 1.
        "optim.lr": tune.grid_search([0.05, 1e4, 0.02, 1e6]),
    },
    max_epochs=3, grace_period=1, reduction_factor=2, seed=0,
)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_diverged_trials_end_as_outcomes_and_the_sweep_goes_on(tmp_path):
    space = tmp_path / "nan.py"
    space.write_text(NAN_SPACE)
    storage, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'ml.db'}"
    out = run_sweeper("launch", str(space), "--local", "--num-cpus", "2", "--storage",
                      str(storage), "--tracking-uri", uri, "--quiet")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = SweepRecord(storage / "nan")
    trials = {t["config"]["optim.lr"]: t for t in record.trials()}
    assert len(trials) == 4 and all(t["status"] == "finished" for t in trials.values())
    for lr in (1e4, 1e6):
        t = trials[lr]
        assert t["outcome"] == "diverged" and t["epochs"] == 1, t
        assert "non-finite training loss in epoch 1" in t["reason"]
        assert t["last"]["val_accuracy"] == 0.0  # the worst value ASHA and the searcher saw
    for lr in (0.05, 0.02):
        assert trials[lr]["outcome"] in ("completed", "pruned"), trials[lr]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("nan")
    runs = client.search_runs([exp.experiment_id], "tags.`sweeper.outcome` = 'diverged'")
    assert len(runs) == 2
    parent = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("sweeper.role") == "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"

    # The name is bound to its space: a changed value or key is refused before Ray starts.
    changed = run_sweeper("launch", str(space), "--local", "--storage", str(storage),
                          "--tracking-uri", uri, "max_epochs=4", "optim.momentum=0.8")
    assert changed.returncode == 2, changed.stdout + changed.stderr
    err = changed.stderr
    assert "sweep 'nan' already exists with a different space" in err.splitlines()[0]
    assert "max_epochs: 3 -> 4" in err and "+ optim.momentum: 0.8 (new)" in err
    assert "--name nan-v2" in err and "sweeper resume nan" in err
    assert len(record.trials()) == 4  # nothing ran
    # The same space again is a resume of a finished sweep: nothing re-runs.
    same = run_sweeper("launch", str(space), "--local", "--num-cpus", "2", "--storage",
                       str(storage), "--tracking-uri", uri, "--quiet")
    assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]
    assert {t["trial_id"]: t["finished"] for t in record.trials()} == \
        {t["trial_id"]: t["finished"] for t in trials.values()}


ONE_TRIAL = """
from sweeper.spaces import Sweep
SWEEP = Sweep(
    name="lost",
    space={"model.arch": "smallcnn", "data.name": "digits", "data.limit": 256,
           "diagnostics.enabled": False, "optim.lr": 0.05},
    scheduler="fifo", max_epochs=3, max_failures=0, seed=0,
)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_whose_checkpoint_is_gone_restarts_from_scratch(tmp_path):
    space = tmp_path / "lost.py"
    space.write_text(ONE_TRIAL)
    storage, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'ml.db'}"
    marker = tmp_path / "failed-once"
    first = run_sweeper("launch", str(space), "--local", "--num-cpus", "2", "--storage",
                        str(storage), "--tracking-uri", uri, "--quiet",
                        env={"SWEEPER_TEST_FAIL_ONCE": f"{marker}:2"})
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # a failed trial
    (trial_dir,) = [p for p in (storage / "lost").iterdir() if p.is_dir() and "-" in p.name]
    checkpoints = list(trial_dir.glob("checkpoint_*"))
    assert checkpoints
    for c in checkpoints:  # lost from storage (deleted by hand, a bucket lifecycle rule...)
        subprocess.run(["rm", "-rf", str(c)], check=True)
    again = run_sweeper("launch", str(space), "--local", "--num-cpus", "2", "--storage",
                        str(storage), "--tracking-uri", uri, "--quiet")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "is missing from storage and nothing newer exists: the trial starts again from " \
           "scratch" in again.stdout
    record = SweepRecord(storage / "lost")
    (trial,) = record.trials()
    assert trial["outcome"] == "completed" and trial["epochs"] == 3
    assert [row["epoch"] for row in record.epochs(trial["trial_id"])] == [1, 2, 3]
    client = MlflowClient(uri)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("lost").experiment_id])
              if r.data.tags.get("sweeper.role") == "trial"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]


STOPPABLE = """
from ray import tune
from sweeper.spaces import Sweep
SWEEP = Sweep(
    name="stoppable",
    space={"model.arch": "smallcnn", "data.name": "digits", "data.limit": 512,
           "diagnostics.enabled": False, "optim.lr": tune.grid_search([0.05, 0.02])},
    scheduler="fifo", max_epochs=40, seed=0,
)
"""


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("how", ["sweeper stop", "SIGTERM", "SIGTERM to the process group"])
def test_stop_exits_3_and_resume_finishes_with_0(tmp_path, how):
    """`sweeper stop`, and SIGTERM: what Slurm, Kubernetes, `docker stop` and `timeout` send before
    SIGKILL. Ray's handlers ended the driver at once on SIGTERM (a C++ stack dump, every run left
    RUNNING, no resume hint); now both save the sweep and exit 3, and what they cut off is stopped.
    Sent to the process group (`timeout`, a job step), the SIGTERM ends the local Ray too, and the
    driver waited 60 s for it before Ray aborted it: now it ends the launch itself in seconds."""
    space = tmp_path / "stoppable.py"
    space.write_text(STOPPABLE.replace("max_epochs=40", "max_epochs=12"))
    storage, uri = tmp_path / "store", f"sqlite:///{tmp_path / 'ml.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "sweeper.cli", "launch", str(space), "--local", "--num-cpus", "2",
         "--storage", str(storage), "--tracking-uri", uri, "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    record = SweepRecord(storage / "stoppable")
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if record.exists() and any(t.get("epochs", 0) >= 2 for t in record.trials()):
                break
            time.sleep(0.5)
        signalled = time.monotonic()
        if how == "SIGTERM":
            driver.send_signal(signal.SIGTERM)
        elif how == "SIGTERM to the process group":
            os.killpg(driver.pid, signal.SIGTERM)  # its own session: the driver and its Ray
        else:
            stop = run_sweeper("stop", "stoppable", "--storage", str(storage))
            assert "asked sweep 'stoppable'" in stop.stdout, stop.stdout + stop.stderr
            # the hint is a command that works: resume needs the Ray the launch used, as launch does
            assert f"`sweeper resume stoppable --storage {storage} --local --num-cpus 2`" in " ".join(stop.stdout.split())
        out, _ = driver.communicate(timeout=240)
        took = time.monotonic() - signalled
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    first_by_ray = False
    if how == "SIGTERM to the process group":
        assert took < 30, took  # not Ray's abort, 60 s after its GCS went
        assert "Ray's processes on this machine ended with the SIGTERM" in out.decode(), out.decode()
        # Ray's core worker ends a driver whose raylet closed the object store ("Terminate the
        # process", exit 1), within a fraction of a second of the signal: the watchdog's quick
        # steps usually come first (exit 3, the hint), not always (seen under load). Either way
        # `sweeper sync` then ends the runs and the record says what happened.
        first_by_ray = driver.returncode == 1
        if not first_by_ray:
            assert "labelled stopped; the sweep resumes from Ray's last saved state" in out.decode()
            assert (f"`sweeper sync stoppable --storage {storage}` delivers its tracking"
                    in out.decode()), out.decode()
        synced = run_sweeper("sync", "stoppable", "--storage", str(storage), "--tracking-uri", uri)
        assert synced.returncode == 0, synced.stdout + synced.stderr
    assert driver.returncode == 3 or first_by_ray, out.decode()[-3000:]
    # sweeper's own hint, not Tune's Python one (a filter drops it: see tuner._NoTuneRestoreHint)
    assert f"sweeper resume stoppable --storage {storage} --local --num-cpus 2`" in " ".join(out.decode().split()) \
        and "Tuner.restore" not in out.decode(), out.decode()
    # what happened, not Tune's "Stop signal received (e.g. via SIGINT/Ctrl+C) ... Press CTRL+C"
    said = ("SIGTERM: stopping this sweep: saving its state one last time" if how.startswith("SIGTERM")
            else "`sweeper stop` asked this sweep to stop: saving its state")
    # (to the group, the launch may end before its main thread, in a wait on Ray, hears the signal)
    assert said in out.decode() or how == "SIGTERM to the process group", out.decode()
    assert "Stop signal received" not in out.decode() and "CTRL+C" not in out.decode()
    assert "SIGTERM received at time" not in out.decode()  # Ray's C++ handler's dump
    assert read_lease(record.dir) is None or first_by_ray  # released: no take-over next time
    status = run_sweeper("status", "stoppable", "--storage", str(storage))
    assert "stoppable': not running" in status.stdout, status.stdout
    # What the stop cut off is `stopped` in the record, `status`, the export and MLflow alike.
    cut = {t["trial_id"] for t in record.trials() if t.get("status") != "finished"}
    assert cut and all(record.trial(tid)["outcome"] == "stopped" for tid in cut), record.trials()
    assert f"{len(cut)} stopped" in status.stdout, status.stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("stoppable").experiment_id

    def runs() -> tuple[dict[str, dict[str, str]], object]:
        found = client.search_runs([experiment])
        children = {r.data.tags["sweeper.trial_id"]: r.data.tags for r in found
                    if r.data.tags.get("sweeper.role") == "trial"}
        (parent,) = [r for r in found if r.data.tags.get("sweeper.role") == "sweep"]
        return children, parent

    children, parent = runs()
    assert {tid for tid, tags in children.items() if tags["sweeper.outcome"] == "stopped"} == cut
    assert parent.data.metrics["trials_stopped"] == len(cut)
    # MLflow's own status column agrees: nothing shows as running after the stop
    statuses = {r.data.tags.get("sweeper.trial_id", "sweep"): r.info.status
                for r in client.search_runs([experiment])}
    assert statuses == {**{tid: "KILLED" for tid in cut}, **{tid: "FINISHED" for tid in children
                                                              if tid not in cut}, "sweep": "KILLED"}
    if how == "SIGTERM":
        return  # the resume below is the same after either stop (Tune's own interrupted state)
    # Without --tracking-uri: a resume keeps the store the sweep's runs are in (it took the default
    # beside the storage, splitting the runs between two stores).
    resumed = run_sweeper("resume", "stoppable", "--local", "--num-cpus", "2", "--storage",
                          str(storage), "--quiet")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert ("taking it over" in resumed.stdout) == first_by_ray, resumed.stdout
    # Every trial ran its whole budget across the stop (what it learned is not this test's business).
    assert all(t["status"] == "finished" and t["epochs"] == 12
               and t["outcome"] not in ("failed", "stopped", "pruned") for t in record.trials()), \
        [(t["outcome"], t["epochs"], t["reason"]) for t in record.trials()]
    children, parent = runs()
    assert {tid: tags["sweeper.outcome"] for tid, tags in children.items()} == {
        t["trial_id"]: t["outcome"] for t in record.trials()}
    # The parent's counts are the latest ones: none stopped, none running any more.
    assert parent.data.metrics["trials_stopped"] == 0 and parent.data.metrics["trials_running"] == 0
    assert {r.info.status for r in client.search_runs([experiment])} == {"FINISHED"}
    assert sum(v for k, v in parent.data.metrics.items() if k.startswith("trials_")) == 2


def test_epochs_a_killed_driver_never_recorded_are_filled_from_the_resumed_checkpoint(tmp_path):
    """Ray's state (and so the checkpoint a resume starts from) can be ahead of the sweep's record
    when a driver dies between its record write and its push to the storage: the first report of
    the resumed trial carries the checkpoint's epochs, and the gap is filled from them, once."""
    from types import SimpleNamespace

    from sweeper.callback import SweepCallback
    from sweeper.spaces import Sweep
    from sweeper.tracking import Tracker

    record = _fake_sweep(tmp_path, "gap")
    sweep = Sweep(name="gap", space={"model.arch": "smallcnn"}, max_epochs=5)
    tracker = Tracker(record.dir, f"sqlite:///{tmp_path / 'ml.db'}", "gap", "uid")
    cb = SweepCallback(sweep, str(record.experiment_dir), tracker, quiet=True, planned=1)
    trial = SimpleNamespace(trial_id="t1", config={"model.arch": "smallcnn", "optim.lr": 0.1},
                            num_failures=0, status="RUNNING")
    for epoch in (1, 2):  # what the dead driver had recorded
        record.append_epoch("t1", {"epoch": epoch, "train_loss": 2.0, "val_accuracy": 0.1})
    history = [{"epoch": e, "train_loss": 2.0 - e / 10, "val_accuracy": 0.1 * e} for e in (1, 2, 3)]
    cb.on_trial_result(0, [trial], trial, {"epoch": 4, "train_loss": 1.5, "val_accuracy": 0.5,
                                           "resumed_history": json.dumps(history)})
    assert [row["epoch"] for row in record.epochs("t1")] == [1, 2, 3, 4]
    assert record.epochs("t1")[2]["train_loss"] == pytest.approx(1.7)  # from the checkpoint
    assert all("resumed_history" not in row for row in record.epochs("t1"))
    tracker.close()


def _spooled(tracker) -> list[dict]:
    return [json.loads(line) for line in tracker.spool_path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("driver", ["dead", "alive"])
def test_sync_ends_the_runs_a_killed_driver_left_running_and_only_then(tmp_path, driver):
    from sweeper.lease import process_start_time
    from sweeper.local import STOPPED_REASON, sync_tracking
    from sweeper.tracking import Tracker

    record = _fake_sweep(tmp_path, "gone")
    record.update_meta(sweep_uid="uid", tracking_uri="http://127.0.0.1:9")
    record.write_trial("t2", {"trial_id": "t2", "name": "b", "config": {"optim.lr": 0.2},
                              "status": "finished", "outcome": "completed", "epochs": 3})
    if driver == "dead":  # its pid now names another process (another start time)
        _write_lease(record.dir, os.getpid(), start_time="1")
    else:
        _write_lease(record.dir, os.getpid(), start_time=process_start_time(os.getpid()))
    # nothing listens on port 9: the operations stay spooled, where the test reads them
    sync_tracking("gone", str(tmp_path), tracking_uri=None, wait_s=0)
    tracker = Tracker(record.dir, "http://127.0.0.1:9", "gone", "uid")
    ops = _spooled(tracker) if tracker.spool_path.exists() else []
    ended = [(op["trial_id"], op["status"]) for op in ops if op["op"] == "terminate"]
    if driver == "alive":  # its own runs are the live driver's to end
        assert ended == [] and record.trial("t1")["status"] == "running"
        return
    assert ended == [("t1", "KILLED"), (None, "KILLED")]
    assert record.trial("t1")["outcome"] == "stopped" and record.trial("t1")["reason"] == STOPPED_REASON
    assert record.trial("t2")["outcome"] == "completed"


def test_a_driver_killed_after_its_last_trial_ended_leaves_a_finished_sweep(tmp_path):
    from sweeper.local import end_interrupted_runs
    from sweeper.tracking import Tracker

    record = _fake_sweep(tmp_path, "late")
    tracker = Tracker(record.dir, f"sqlite:///{tmp_path / 'ml.db'}", "late", "uid")
    for tid in ("t1", "t2"):
        record.write_trial(tid, {"trial_id": tid, "name": tid, "config": {}, "status": "finished",
                                 "outcome": "pruned", "epochs": 1})
    assert end_interrupted_runs(record, tracker) == []
    assert [(op["trial_id"], op["status"]) for op in _spooled(tracker)] == [(None, "FINISHED")]
    # one planned trial never started: the sweep was cut short
    record.update_meta(planned_trials=3)
    end_interrupted_runs(record, tracker)
    assert _spooled(tracker)[-1]["status"] == "KILLED"


def test_a_trial_ends_with_its_last_value_labelled_and_its_best_beside_it(tmp_path, capsys):
    # The progress line says "best val_accuracy 0.63"; the trial's own line gave 0.48 unlabelled.
    from types import SimpleNamespace

    from sweeper.callback import SweepCallback
    from sweeper.spaces import Sweep
    from sweeper.tracking import Tracker

    record = _fake_sweep(tmp_path, "ends")
    tracker = Tracker(record.dir, f"sqlite:///{tmp_path / 'ml.db'}", "ends", "uid")
    sweep = Sweep(name="ends", space={"model.arch": "smallcnn"}, max_epochs=2)
    cb = SweepCallback(sweep, str(record.experiment_dir), tracker, quiet=False, planned=2)
    trial = SimpleNamespace(trial_id="t1", config={"optim.lr": 0.1}, num_failures=0, status="RUNNING",
                            last_result=None)
    cb.on_trial_start(0, [trial], trial)
    for epoch, acc in ((1, 0.6319), (2, 0.4792)):
        trial.last_result = {"epoch": epoch, "training_iteration": epoch, "val_accuracy": acc,
                             "val_loss": 1.0, "train_loss": 1.0, "outcome": "running" if epoch < 2
                             else "completed"}
        cb.on_trial_result(epoch, [trial], trial, dict(trial.last_result))
    cb.on_trial_complete(2, [trial], trial)
    tracker.close()
    line = next(line for line in capsys.readouterr().out.splitlines() if "after   2 epochs" in line)
    assert "last val_accuracy=0.4792 (best 0.6319)" in line, line


def test_an_epoch_run_again_after_a_resume_keeps_its_first_copy_everywhere(tmp_path):
    """A driver killed after recording epoch 2 but before Ray saved its state: the resumed trial
    trains epoch 2 again. MLflow never logs a step twice, so it holds the first copy; the record,
    the trial's last/best and the export must give that copy too, not the re-run's."""
    from types import SimpleNamespace

    from sweeper.callback import SweepCallback
    from sweeper.export import trial_rows
    from sweeper.spaces import Sweep
    from sweeper.tracking import Tracker

    record = _fake_sweep(tmp_path, "rerun")
    sweep = Sweep(name="rerun", space={"model.arch": "smallcnn"}, max_epochs=3)
    tracker = Tracker(record.dir, f"sqlite:///{tmp_path / 'ml.db'}", "rerun", "uid")
    trial = SimpleNamespace(trial_id="t1", config={"model.arch": "smallcnn", "optim.lr": 0.1},
                            num_failures=0, status="RUNNING", last_result={}, path="t1-dir")
    for epoch in (1, 2):  # what the dead driver recorded (and delivered)
        record.append_epoch("t1", {"epoch": epoch, "val_accuracy": 0.5 + epoch / 10,
                                   "epoch_seconds": 1.0})
    cb = SweepCallback(sweep, str(record.experiment_dir), tracker, quiet=True, planned=1)
    spooled = len(_spooled(tracker)) if tracker.spool_path.exists() else 0
    cb.on_trial_result(0, [trial], trial, {"epoch": 2, "val_accuracy": 0.9, "epoch_seconds": 7.0})
    rows = record.epochs("t1")
    assert [(r["epoch"], r["epoch_seconds"]) for r in rows] == [(1, 1.0), (2, 1.0)]
    assert len((record.trials_dir / "t1.jsonl").read_text().splitlines()) == 2  # nothing appended
    rec = record.trial("t1")
    assert rec["last"]["epoch_seconds"] == 1.0 and rec["best"]["val_accuracy"] == pytest.approx(0.7)
    new_ops = _spooled(tracker)[spooled:] if tracker.spool_path.exists() else []
    assert not [op for op in new_ops if op["op"] == "metrics"]  # MLflow is not sent the copy
    # The next epoch is new: recorded and tracked as usual.
    cb.on_trial_result(0, [trial], trial, {"epoch": 3, "val_accuracy": 0.8, "epoch_seconds": 1.5})
    assert [r["epoch"] for r in record.epochs("t1")] == [1, 2, 3]
    assert [op["step"] for op in _spooled(tracker) if op["op"] == "metrics"] == [3]
    trial.last_result = {"epoch": 3, "val_accuracy": 0.8, "epoch_seconds": 1.5, "outcome": "completed"}
    cb.on_trial_complete(0, [trial], trial)
    (row,) = trial_rows(record)
    assert row["best_val_accuracy"] == pytest.approx(0.8) and row["final_val_accuracy"] == pytest.approx(0.8)
    tracker.close()


def test_a_record_written_with_a_repeated_epoch_reads_its_first_copy(tmp_path):
    record = _fake_sweep(tmp_path, "old")
    for epoch, seconds in ((1, 1.0), (2, 2.0), (2, 9.0), (3, 3.0)):
        record.append_epoch("t1", {"epoch": epoch, "epoch_seconds": seconds})
    assert [(r["epoch"], r["epoch_seconds"]) for r in record.epochs("t1")] == [(1, 1.0), (2, 2.0),
                                                                              (3, 3.0)]


def test_an_interrupted_launch_labels_its_unfinished_trials_stopped_until_they_run_again(tmp_path):
    from types import SimpleNamespace

    from sweeper.callback import SweepCallback
    from sweeper.local import STOPPED_REASON, mark_stopped
    from sweeper.export import trial_rows
    from sweeper.spaces import Sweep
    from sweeper.tracking import Tracker

    record = _fake_sweep(tmp_path, "cut")
    record.write_trial("t2", {"trial_id": "t2", "name": "b", "config": {"optim.lr": 0.2},
                              "status": "finished", "outcome": "completed", "epochs": 3})
    tracker = Tracker(record.dir, f"sqlite:///{tmp_path / 'ml.db'}", "cut", "uid")
    assert mark_stopped(record, tracker) == ["t1"]
    assert record.trial("t1")["status"] == "stopped" and record.trial("t1")["outcome"] == "stopped"
    assert record.trial("t2")["outcome"] == "completed"  # a finished trial keeps its outcome
    tags = [op for op in _spooled(tracker) if op["op"] == "tags"]
    assert tags == [{"op": "tags", "trial_id": "t1", "tags": {"sweeper.outcome": "stopped"}}]
    # not left RUNNING in MLflow's UI: KILLED until a resume starts it again
    ended = [(op["trial_id"], op["status"]) for op in _spooled(tracker) if op["op"] == "terminate"]
    assert ended == [("t1", "KILLED")]
    rows = {r["trial_id"]: r for r in trial_rows(record)}
    assert rows["t1"]["outcome"] == "stopped" and rows["t1"]["reason"] == STOPPED_REASON
    status = run_sweeper("status", "cut", "--storage", str(tmp_path))
    assert status.returncode == 0 and "1 stopped" in status.stdout, status.stdout
    assert mark_stopped(record, tracker) == []  # once

    # The resumed launch starts it again: running, its outcome undecided, MLflow told so.
    sweep = Sweep(name="cut", space={"model.arch": "smallcnn"}, max_epochs=3)
    cb = SweepCallback(sweep, str(record.experiment_dir), tracker, quiet=True, planned=2)
    trial = SimpleNamespace(trial_id="t1", config={"optim.lr": 0.1}, num_failures=0,
                            status="RUNNING")
    cb.on_trial_start(0, [trial], trial)
    rec = record.trial("t1")
    assert rec["status"] == "running" and "outcome" not in rec and "reason" not in rec
    assert [op["tags"] for op in _spooled(tracker) if op["op"] == "tags"][-1] == {
        "sweeper.outcome": "running"}
    tracker.close()


def test_a_copy_of_a_running_sweeps_folder_is_not_run_by_that_driver(tmp_path):
    """`cp -r` of a running sweep's storage: the copy's lease named the live driver, so status called
    the copy running, `stop` on it claimed to ask that driver (which never reads the copy), and a
    launch of the copy would have counted it as the driver's. The driver, its lease and its Ray
    are the original's: nothing done to the copy may reach them."""
    import shutil

    from conftest import run_sweeper
    from sweeper.lease import _inode

    session = f"/tmp/ray/session_test_{uuid.uuid4().hex}"
    its_ray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                                f"--session-dir={session}"])
    record = _fake_sweep(tmp_path / "orig", "cp")
    lease = DriverLease(record.dir).claim()  # this process is the original's live driver
    try:
        lease.set_session_dir(session)
        shutil.copytree(tmp_path / "orig", tmp_path / "copy")
        copy = SweepRecord(tmp_path / "copy" / "cp")
        seen = read_lease(copy.dir)
        assert seen.copied_from == str(record.dir.resolve()) and not seen.alive
        assert read_lease(record.dir).alive and read_lease(record.dir).copied_from is None
        # The same folder by another path (a symlink here; a bind mount, NFS mounted twice) is the
        # original, driver and all: a second launch through it is still refused.
        (tmp_path / "alias").symlink_to(tmp_path / "orig")
        assert read_lease(tmp_path / "alias" / "cp" / "sweeper").alive
        with pytest.raises(LeaseHeld):
            DriverLease(tmp_path / "alias" / "cp" / "sweeper").claim()
        assert clean_orphans(seen) == [] and its_ray.poll() is None  # never the original's Ray

        status = run_sweeper("status", "cp", "--storage", str(tmp_path / "copy"))
        text = " ".join(status.stdout.split())
        assert status.returncode == 0 and f"not running here: this folder is a copy of {record.experiment_dir}" \
            in text, text
        stop = run_sweeper("stop", "cp", "--storage", str(tmp_path / "copy"))
        text = " ".join(stop.stdout.split())
        assert stop.returncode == 0 and "is not running here" in text, text
        assert f"`sweeper stop cp --storage {tmp_path / 'orig'}` stops it" in text, text
        assert not (copy.dir / "stop_request.json").exists() and not (record.dir / "stop_request.json").exists()
        # The original's own status is unchanged: its driver runs it.
        status = run_sweeper("status", "cp", "--storage", str(tmp_path / "orig"))
        assert "'cp': running (driver pid" in " ".join(status.stdout.split()), status.stdout
    finally:
        lease.release()
        its_ray.kill()
        its_ray.wait()
    # A folder moved (or copied) after its driver died: that driver's lease is a dead one, as ever.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    moved = tmp_path / "moved" / "cp" / "sweeper"
    moved.mkdir(parents=True)
    (moved / "driver.json").write_text(json.dumps({
        "pid": dead.pid, "host": socket.gethostname(), "start_time": "1", "started": 1.0,
        "heartbeat": 1.0, "record": str(record.dir.resolve()), "record_inode": list(_inode(record.dir))}))
    seen = read_lease(moved)
    assert seen.copied_from and not seen.alive and not seen.runs_the_original and died_holding(moved, seen)
