"""The command line: user errors are one clear line each with exit code 2, never a traceback."""

import os
import subprocess
import sys

import pytest


def sweeper(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeper.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("setting,message", [
    ("model.arch=vgg99", "model.arch='vgg99' is not one of ["),
    ("model.init=kaiming2", "model.init='kaiming2' is not one of ['default', 'he', 'normal', 'xavier']"),
    ("dataset=mnist", "data.name='mnist' is not one of ["),
    ("optim.lr=-0.1", "optim.lr=-0.1 must be > 0"),
    ("width=0", "model.width=0.0 must be > 0"),
    ("width=-1", "model.width=-1.0 must be > 0"),
    # A batch of one is skipped (BatchNorm): batch_size=1 trained nothing and was called diverged.
    ("data.batch_size=1", "data.batch_size=1 must be >= 2 (a batch of one is skipped"),
])
def test_bad_input_is_one_clear_message_and_exit_2(setting, message):
    out = sweeper("debug", setting, "epochs=1")
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert out.stderr.count("error:") == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_debug_refuses_a_missing_gpu_before_printing_the_config():
    """The 60-line config table used to come first, pushing the one line that matters off screen."""
    out = sweeper("debug", "device=cuda", "epochs=1")
    assert out.returncode == 2, out.stderr
    assert "device='cuda' was asked for, but torch sees no CUDA device" in out.stderr
    assert out.stdout == "", out.stdout


def test_several_bad_settings_are_reported_together():
    out = sweeper("debug", "model.arch=vgg99", "model.init=kaiming2", "optim.lr=0")
    assert out.returncode == 2
    assert out.stderr.count("error:") == 3


def test_missing_dataset_names_the_directory_and_the_alternatives(tmp_path):
    out = sweeper("debug", "dataset=cifar10", "--data-dir", str(tmp_path), "epochs=1")
    assert out.returncode == 2
    assert "cifar10" in out.stderr and str(tmp_path) in out.stderr
    assert "Traceback" not in out.stderr


def test_debug_runs_one_trial_in_the_foreground_and_prints_an_epoch_table():
    out = sweeper("debug", "search_spaces/vgg_depth.py", "dataset=digits", "width=1/8",
                  "model.arch=vgg11", "model.init=he", "model.batch_norm=true", "lr=0.05",
                  "--epochs", "2", "--no-diagnostics")
    assert out.returncode == 0, out.stderr
    assert "model.arch" in out.stdout and "vgg11" in out.stdout
    lines = [l for l in out.stdout.splitlines() if l.strip().startswith(("1 ", "2 "))]
    assert len(lines) == 2, out.stdout
    assert "outcome: completed" in out.stdout
    # The test split is measured once, after the last epoch, and debug says what it gave.
    (test,) = [l for l in out.stdout.splitlines() if l.startswith("test: accuracy ")]
    assert "top-1 error" in test and "top-5 error" in test


def test_validate_reports_every_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from sweeper.spaces import Sweep\n"
                   "SWEEP = Sweep(name='b', space={'model.init': 'kaiming2'})\n")
    out = sweeper("validate", "search_spaces/vgg_depth.py", str(bad))
    assert out.returncode == 2
    assert "vgg_depth.py: ok" in out.stdout and "24 grid cell(s)" in out.stdout
    assert "model.init='kaiming2' is not one of" in out.stderr


def test_validate_takes_overrides_as_launch_does():
    """`validate FILE max_epochs=-1` said the file 'max_epochs=-1' does not exist."""
    out = sweeper("validate", "search_spaces/vgg_depth.py", "max_epochs=-1")
    assert out.returncode == 2
    assert "max_epochs=-1 must be an integer >= 1" in out.stderr
    assert "does not exist" not in out.stderr and out.stderr.count("  - ") == 1, out.stderr
    out = sweeper("validate", "search_spaces/vgg_depth.py", "max_epochs=3", "--set", "seeds=2")
    assert out.returncode == 0, out.stderr
    assert "48 grid cell(s) x 3 sample(s) = 144 trials" in out.stdout  # both kinds applied
    assert "max_epochs=3" in out.stdout
    out = sweeper("validate", "max_epochs=3")
    assert out.returncode == 2 and "validate needs a search-space file" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_long_bad_name_is_not_echoed_whole():
    out = sweeper("launch", "search_spaces/vgg_depth.py", "--dry-run", "--name", "x" * 5000)
    assert out.returncode == 2
    assert "(5000 characters) must be 1-100 letters" in out.stderr and len(out.stderr) < 400


def test_launch_dry_run_prints_the_grid_without_starting_ray():
    out = sweeper("launch", "search_spaces/vgg_depth.py", "--dry-run", "dataset=digits")
    assert out.returncode == 0, out.stderr
    assert "24 grid cell(s) x 3 sample(s) = 72 trials" in out.stdout
    assert "optim.lr" in out.stdout
    # --local checks this machine's CPUs and datasets as the launch would, but reads no weight file:
    # a fine-tuning study is planned before the sweep it starts from has run.
    out = sweeper("launch", "search_spaces/vgg_depth.py", "--dry-run", "--local", "dataset=digits",
                  "model.init_from=sweep:not_run_yet/best")
    assert out.returncode == 0, out.stderr
    assert "72 trials" in out.stdout


def test_dry_run_refuses_the_storage_a_launch_refuses_and_leaves_nothing_behind(tmp_path):
    """--dry-run printed the plan for --storage /etc/passwd, which the launch then refused."""
    afile = tmp_path / "afile"
    afile.write_text("")
    out = sweeper("launch", "search_spaces/vgg_depth.py", "--dry-run", "dataset=digits",
                  "--storage", str(afile))
    assert out.returncode == 2, out.stdout
    assert f"storage={str(afile)!r} is not writable" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr and "grid cell(s)" not in out.stdout
    fresh = tmp_path / "new" / "sweeps"
    out = sweeper("launch", "search_spaces/vgg_depth.py", "--dry-run", "dataset=digits",
                  "--storage", str(fresh))
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "new").exists()  # probed, then removed: a dry run writes nothing
    out = sweeper("launch", "search_spaces/vgg_depth.py", "--dry-run", "dataset=digits",
                  "--storage", afile.as_uri())  # a file:// URI is a path on this machine too
    assert out.returncode == 2 and "is not writable" in out.stderr, out.stdout


def test_a_file_where_the_sweeps_directory_goes_is_refused_by_dry_run_and_launch(tmp_path):
    """A file at STORAGE/NAME: the launch ended in a NotADirectoryError traceback (exit 1) from the
    driver lease, and --dry-run passed."""
    (tmp_path / "taken").write_text("not a sweep")
    for extra in (["--dry-run"], ["--local", "--num-cpus", "1"]):
        out = sweeper("launch", "search_spaces/vgg_depth.py", *extra, "dataset=digits", "--name", "taken",
                      "--storage", str(tmp_path))
        text = " ".join(out.stderr.split())
        assert out.returncode == 2, (extra, out.stdout, out.stderr)
        assert f"name='taken': {tmp_path / 'taken'} is a file, not a sweep's directory" in text, text
        assert "--name NEW" in text and "Traceback" not in out.stderr
    assert (tmp_path / "taken").read_text() == "not a sweep" and sorted(tmp_path.iterdir()) == [tmp_path / "taken"]
    # A folder of another tool's files holding a file where the sweep's record folder goes: the same.
    (tmp_path / "other" / "sweeper").parent.mkdir()
    (tmp_path / "other" / "sweeper").write_text("")
    out = sweeper("launch", "search_spaces/vgg_depth.py", "--local", "--num-cpus", "1", "dataset=digits",
                  "--name", "other", "--storage", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"{tmp_path / 'other' / 'sweeper'} is a file, not a sweep's directory" in " ".join(out.stderr.split())


def test_dry_run_lists_at_most_100_grid_cells_and_counts_the_rest(tmp_path):
    space = tmp_path / "wide.py"
    space.write_text('"""q"""\nfrom ray import tune\nfrom sweeper.spaces import Sweep\n'
                     'SWEEP = Sweep(name="wide", space={"optim.lr": tune.grid_search('
                     '[i / 1000 for i in range(1, 151)])})\n')
    out = sweeper("launch", str(space), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "150 grid cell(s) x 1 sample(s) = 150 trials" in out.stdout
    assert "... and 50 more grid cells" in out.stdout
    assert "│ 99 " in out.stdout and "│ 100 " not in out.stdout


def test_launch_without_a_cluster_explains_both_options(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = sweeper("launch", "search_spaces/vgg_depth.py", "dataset=digits")
    assert out.returncode == 2
    assert "--address" in out.stderr and "RAY_ADDRESS" in out.stderr and "--local" in out.stderr


def test_a_name_this_machine_launched_elsewhere_is_not_taken_over_without_storage(tmp_path, monkeypatch):
    """`launch FILE` without --storage, for a name whose sweep lives on another local storage: a
    second sweep in ./sweeps would take the name over (status, report and resume would find it)."""
    from conftest import run_sweeper
    from sweeper.records import SweepRecord
    from sweeper.store import index_remember

    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path / "cache"))
    first = tmp_path / "first"
    SweepRecord(first / "taken").create({"name": "taken"}, "")
    index_remember("taken", str(first))
    space = tmp_path / "taken.py"
    space.write_text('"""q"""\nfrom sweeper.spaces import Sweep\n'
                     'SWEEP = Sweep(name="taken", space={"model.arch": "smallcnn", "data.name": "digits"})\n')
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    for dry in ([], ["--dry-run"]):  # the dry run printed a plan for it
        out = run_sweeper("launch", str(space), "--local", *dry, cwd=cwd, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"a sweep named 'taken' already lives in {first}" in out.stderr
        assert f"pass --storage {first} to resume it" in out.stderr
        assert list(cwd.iterdir()) == []  # refused before anything was written


def _two_sweeps_named_taken(first, cwd, tmp_path, monkeypatch):
    """'taken' in ``first`` (where this machine last launched it) and in ``cwd``/sweeps, run from
    ``cwd``: what resolve_storage raised."""
    from sweeper.config import ConfigError
    from sweeper.local import resolve_storage
    from sweeper.records import SweepRecord
    from sweeper.store import index_remember

    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(tmp_path / "cache"))
    SweepRecord(first / "taken").create({"name": "taken"}, "")
    SweepRecord(cwd / "sweeps" / "taken").create({"name": "taken"}, "")
    index_remember("taken", str(first))
    monkeypatch.chdir(cwd)
    with pytest.raises(ConfigError) as err:
        resolve_storage("taken", None)
    return err


def test_a_name_in_two_storages_is_not_guessed_by_resume_status_or_report(tmp_path, monkeypatch):
    """./sweeps holds 'taken' and this machine last launched 'taken' on another storage: `resume
    taken` continued the ./sweeps one (a finished namesake) without a word. Now every verb asks."""
    from conftest import run_sweeper
    from sweeper.local import resolve_storage
    from sweeper.store import index_remember

    first, cwd = tmp_path / "first", tmp_path / "cwd"
    err = _two_sweeps_named_taken(first, cwd, tmp_path, monkeypatch)
    assert err.value.problems == [
        f"two sweeps are named 'taken': one in {cwd / 'sweeps'} (this directory's ./sweeps) and one in "
        f"{first} (where this machine last launched 'taken'); pass --storage sweeps or --storage "
        f"{first} to say which"]
    assert resolve_storage("taken", str(first)) == str(first)
    assert resolve_storage("taken", "sweeps") == "sweeps"
    # launched here last (or the other one gone): ./sweeps, as before
    index_remember("taken", str(cwd / "sweeps"))
    assert resolve_storage("taken", None) is None
    index_remember("taken", str(tmp_path / "gone"))
    assert resolve_storage("taken", None) is None
    index_remember("taken", str(first))
    space = tmp_path / "taken.py"
    space.write_text('"""q"""\nfrom sweeper.spaces import Sweep\n'
                     'SWEEP = Sweep(name="taken", space={"model.arch": "smallcnn", "data.name": "digits"})\n')
    for verb in (("resume", "taken"), ("status", "taken"), ("report", "taken"),
                 ("launch", str(space), "--local", "--dry-run"), ("launch", str(space), "--local")):
        out = run_sweeper(*verb, cwd=cwd, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "two sweeps are named 'taken'" in out.stderr and "Traceback" not in out.stderr
    from sweeper.store import index_lookup
    assert index_lookup("taken") == str(first)  # the refused launch left the index as it was


def test_sweepers_own_gcs_access_gives_up_within_gcs_retry_s(monkeypatch, tmp_path):
    """pyarrow's GCS client retries for 15 minutes by default: a machine without Google credentials sat
    in `status NAME --storage gs://...` for over 400 s. sweeper's own reads now give up after
    GCS_RETRY_S (a URI's own retry_limit_seconds wins) and say what is missing in one line."""
    import time
    from datetime import timedelta

    from typer.testing import CliRunner

    import sweeper.store as store
    from sweeper.cli import app

    def limit(uri):
        fs, _ = store.filesystem(uri)
        return fs.__reduce__()[1][0]["retry_time_limit"]  # GcsFileSystem's pickled options

    assert limit("gs://bucket/sweeps") == timedelta(seconds=store.GCS_RETRY_S)
    assert limit("gs://bucket/sweeps?retry_limit_seconds=600") == timedelta(seconds=600)
    assert store.filesystem("gs://bucket/sweeps?retry_limit_seconds=600")[1] == "bucket/sweeps"

    monkeypatch.setattr(store, "GCS_RETRY_S", 2)
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    result = CliRunner().invoke(app, ["status", "some_sweep", "--storage", "gs://sweeper-test-no-bucket/x"])
    assert time.monotonic() - start < 60
    assert result.exit_code == 2, result.output
    assert "storage='gs://sweeper-test-no-bucket/x' cannot be read: " in result.output
    assert "Traceback" not in result.output
    if not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):  # the usual case off Google Cloud
        assert "no Google credentials on this machine (set GOOGLE_APPLICATION_CREDENTIALS" in result.output


@pytest.mark.parametrize("verb", ["status", "report", "export", "stop", "sync"])
def test_a_path_where_a_sweep_name_goes_is_refused_with_the_name_and_storage_to_give(verb, tmp_path):
    """`status ../store/gpu1` read another directory's sweep, and `export` wrote into it."""
    out = sweeper(verb, "../store/gpu1", "--storage", str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert "name='../store/gpu1' must be 1-100 letters" in out.stderr
    assert "give its name and storage: gpu1 --storage ../store" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_diverged_debug_run_still_shows_the_layers_at_init():
    """A non-finite epoch measures no layer; the table was empty just when the init's gains (20x per
    layer for N(0, 0.1) at full width) say where the loss blew up."""
    from rich.console import Console

    from sweeper.local import layer_table

    initial = {"layer/l00_conv": "features.0", "act_std/l00_conv": 0.49, "grad_norm/l00_conv": 2.5e4,
               "gain_pred/l00_conv": 20.6, "gain_meas/l00_conv": 20.7}
    console = Console(width=200, record=True)
    console.print(layer_table(initial, {"epoch": 1}))
    text = console.export_text()
    assert "layers at init (not measured after epoch 1: the loss was not finite)" in text
    assert "l00_conv" in text and "0.49 -> -" in text and "20.6 / 20.7" in text
    console = Console(width=200, record=True)
    console.print(layer_table(initial, {"epoch": 2, "act_std/l00_conv": 0.7}))
    text = console.export_text()
    assert "layers at init -> after epoch 2" in text and "0.49 -> 0.7" in text


def test_debug_of_a_space_file_trains_with_the_threads_a_sweep_trial_gets(tmp_path, monkeypatch):
    """Ray sets a trial's OMP_NUM_THREADS to its CPUs; debug used every core, so a net near chance
    followed other roundings and debug's VGG-19 stalled where the sweep's same config completed."""
    from sweeper.local import _debug_sweep_and_config, _trial_threads

    space = tmp_path / "space.py"
    space.write_text('"""q"""\nfrom sweeper.spaces import Sweep\n'
                     'SWEEP = Sweep(name="t", space={"model.arch": "smallcnn", "data.name": "digits"},\n'
                     '              resources=lambda cfg: {"cpu": 2.5, "gpu": 0})\n')
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    sweep, cfg = _debug_sweep_and_config(space, [])
    assert _trial_threads(sweep, cfg) == (2, "as the sweep's trials (resources cpu=2.5)")
    assert _trial_threads(None, cfg) is None  # settings alone: no sweep to match
    out = sweeper("debug", "search_spaces/vgg_depth.py", "dataset=digits", "width=1/8", "model.arch=vgg11",
                  "--epochs", "1", "--no-diagnostics", "data.limit=64")
    assert out.returncode in (0, 1), out.stderr
    assert "device: cpu, 1 thread(s) as the sweep's trials (resources cpu=1)" in out.stdout
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's count wins, as it does in Ray's workers
    assert _trial_threads(sweep, cfg) is None


def test_debug_resumes_a_checkpoint_with_its_own_config_and_refuses_another_model(tmp_path):
    """`debug FILE --resume DIR` rebuilt the model from the file's sample: a checkpoint of another
    trial ended in a state_dict traceback (exit 1). Without a file the checkpoint's config is used."""
    ck = tmp_path / "ck"
    base = ["model.arch=smallcnn", "dataset=digits", "width=1/8", "data.limit=64", "--no-diagnostics"]
    out = sweeper("debug", *base, "--epochs", "1", "--checkpoint-dir", str(ck))
    assert out.returncode == 0, out.stderr
    out = sweeper("debug", "--resume", str(ck), "model.arch=vgg11", "--epochs", "2")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert ("the checkpoint was trained with another config: model.arch='smallcnn' there, 'vgg11' here"
            in " ".join(out.stderr.split()))
    out = sweeper("debug", "--resume", str(ck), "--epochs", "2", "--no-diagnostics")
    assert out.returncode == 0, out.stderr
    rows = [l.split() for l in out.stdout.splitlines() if l.strip().startswith(("1 ", "2 "))]
    assert [r[0] for r in rows] == ["2"], out.stdout  # continued: only epoch 2 trained
    assert "smallcnn" in out.stdout


def test_the_resume_hint_names_the_storage_unless_it_is_this_directorys(tmp_path, monkeypatch):
    """After an interrupt on --storage elsewhere, the hint said `sweeper resume tiny`; following it
    resumed a finished namesake in ./sweeps and left the interrupted sweep stopped."""
    from sweeper.store import resume_command

    monkeypatch.chdir(tmp_path)
    assert resume_command("tiny", None) == "`sweeper resume tiny`"
    assert resume_command("tiny", "sweeps") == "`sweeper resume tiny`"
    other = tmp_path / "my sweeps"
    assert resume_command("tiny", str(other)) == f"`sweeper resume tiny --storage '{other}'`"
    # What reaches a MinIO store stays (without it the command sent the user to AWS); secrets do not.
    assert resume_command("tiny", "s3://bucket/p?endpoint_override=http://h:9000&scheme=http") == \
        "`sweeper resume tiny --storage 's3://bucket/p?endpoint_override=http://h:9000&scheme=http'`"
    assert resume_command("tiny", "s3://AKIA:s3cr3t@bucket/p?access_key=AKIA&secret_key=s3cr3t"
                                  "&session_token=t0k&region=eu-west-1", verb="status") == \
        "`sweeper status tiny --storage 's3://bucket/p?region=eu-west-1'`"
    # `resume` needs the Ray the launch used: the hint without it was refused ("no Ray cluster given").
    from sweeper.store import cluster_flag

    assert cluster_flag(True, None) == "--local" and cluster_flag(False, None) is None
    assert cluster_flag(True, None, 2) == "--local --num-cpus 2"
    assert cluster_flag(False, "10.0.0.5:6379") == "--address 10.0.0.5:6379"
    assert resume_command("tiny", str(other), cluster="--local") == \
        f"`sweeper resume tiny --storage '{other}' --local`"
    assert resume_command("tiny", None, verb="sync", cluster="--local") == "`sweeper sync tiny`"


def test_the_readers_of_a_sweep_work_where_ray_is_not_installed(tmp_path):
    """status, export, report, stop and sync read the record and MLflow: a laptop with MLflow and no
    Ray (or a GPU box kept for `debug`) could not run them, since they came through the tuner."""
    from conftest import run_sweeper_without
    from test_report import FALLING, _add_trial, _meta

    from sweeper.records import SweepRecord

    record = SweepRecord(tmp_path / "sweeps" / "toy")
    record.create(_meta(name="toy", planned_trials=1, sweep_uid="uid-toy"), "SWEEP = ...\n")
    _add_trial(record, 1, "vgg11", "he", True, 0.01, "completed", [0.4, 0.7, 0.9], FALLING)
    for verb in (["status", "toy"], ["export", "toy", "--format", "csv", "--out", str(tmp_path / "t.csv")],
                 ["report", "toy"], ["stop", "toy"], ["sync", "toy", "--wait", "0"]):
        out = run_sweeper_without(("ray",), *verb, cwd=tmp_path)
        assert out.returncode == 0 and "ray" not in out.stderr.lower(), (verb, out.stdout, out.stderr)
    assert (tmp_path / "t.csv").is_file()
    launch = run_sweeper_without(("ray",), "resume", "toy", "--local", cwd=tmp_path)
    assert launch.returncode == 2 and "sweeper resume needs ray, which is not installed" in launch.stderr


def test_the_summary_of_a_stopped_sweep_counts_the_trials_it_never_started(capsys):
    """After `sweeper stop` a 2-trial grid printed "1 trials (1 stopped)": the other never started."""
    from sweeper.cli import _print_summary
    from sweeper.tuner import LaunchResult

    _print_summary(LaunchResult(name="s", experiment_dir="/x/s", outcomes={"stopped": 1}, trials=1,
                                planned=2, epochs=4, interrupted=True))
    out = capsys.readouterr().out
    assert "sweep 's': 2 trials (1 stopped, 1 not started); 4 epochs run" in out
    _print_summary(LaunchResult(name="s", experiment_dir="/x/s", outcomes={"completed": 2}, trials=2,
                                planned=2, epochs=8))
    assert "sweep 's': 2 trials (2 completed); 8 epochs run" in capsys.readouterr().out


def test_a_model_or_images_too_big_for_memory_is_a_setting_to_lower_not_a_traceback(tmp_path):
    """model.width=1000 ended launch and validate's dry run in a DefaultCPUAllocator traceback (exit 1),
    and data.resolution=30000 ended debug the same way: sizes this machine cannot hold are the user's."""
    # Sizes no machine can allocate (petabytes), so that no allocation succeeds lazily and then
    # runs the test machine out of memory.
    out = sweeper("launch", "search_spaces/vgg_depth.py", "--dry-run", "dataset=digits", "model.width=100000")
    text = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "at model.width=100000 needs more memory than this machine could give (it asked for" in text
    assert "GB): lower model.width" in text
    out = sweeper("debug", "model.arch=smallcnn", "data.name=digits", "data.resolution=10000000", "--epochs", "1",
                  f"data.dir={tmp_path}")
    text = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "this trial needs more memory than this machine could give" in text
    assert "lower data.resolution, model.width or data.batch_size" in text


def test_debug_exits_0_for_a_stalled_trial_a_finding_as_in_a_sweep():
    """debug exited 1 (an internal error, by the exit statuses) for any outcome but completed."""
    out = sweeper("debug", "model.arch=vgg11", "model.init=normal", "data.name=digits", "model.width=0.125",
                  "--epochs", "1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "outcome: stalled" in out.stdout


def test_a_file_that_is_not_sqlite_where_the_mlflow_store_goes_is_refused_before_anything_runs(tmp_path):
    """A garbage mlflow.db beside the sweeps: the launch trained, then retried delivery for ever (sync
    said 'file is not a database' with exit 4), and `sweeper ui` ended in MLflow's traceback."""
    (tmp_path / "mlflow.db").write_text("garbage, not a database\n")
    expected = (f"the MLflow store 'sqlite:///{tmp_path / 'mlflow.db'}': {tmp_path / 'mlflow.db'} is not "
                "an SQLite database")
    for args in (["launch", "search_spaces/vgg_depth.py", "--dry-run", "dataset=digits"],
                 ["launch", "search_spaces/vgg_depth.py", "--local", "--num-cpus", "1", "dataset=digits"],
                 ["ui"]):
        out = sweeper(*args, "--storage", str(tmp_path))
        text = " ".join(out.stderr.split())
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stdout, out.stderr[-2000:])
        assert expected in text and "move this one aside" in text, (args, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # nothing started, nothing written
    # An empty file is one SQLite makes into a database: not refused.
    (tmp_path / "mlflow.db").write_bytes(b"")
    out = sweeper("launch", "search_spaces/vgg_depth.py", "--dry-run", "dataset=digits", "--storage", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]


def test_settings_and_surroundings_a_user_gets_wrong_are_exit_2_with_the_fix(tmp_path):
    """Each was a traceback (exit 1): GoogLeNet below 15 px at launch (validate said it cleanly), a
    SWEEPER_CACHE_DIR that is a file, and a bare model.pretrained file name read as a weights name."""
    out = sweeper("launch", "search_spaces/vgg_depth.py", "--dry-run", "dataset=digits", "model.arch=googlenet",
                  "data.resolution=8")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "GoogLeNet needs inputs of at least 15x15 px" in " ".join(out.stderr.split())
    afile = tmp_path / "afile"
    afile.write_text("")
    env = {**os.environ, "SWEEPER_CACHE_DIR": str(afile)}
    out = subprocess.run([sys.executable, "-m", "sweeper.cli", "launch", "search_spaces/vgg_depth.py",
                          "--dry-run", "--local", "dataset=digits"], capture_output=True, text=True,
                         timeout=300, env=env)
    text = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"the data cache {afile} (SWEEPER_CACHE_DIR" in text and "point SWEEPER_CACHE_DIR at a directory" in text
    out = subprocess.run([sys.executable, "-m", "sweeper.cli", "debug", "model.arch=smallcnn", "data.name=digits",
                          "model.pretrained=afile", "--epochs", "1"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "torchvision has no weights" not in out.stderr and "empty" in out.stderr, out.stderr


@pytest.mark.parametrize("damage,why", [
    ("no tuner.pkl", "tuner.pkl is missing"),
    ("garbage tuner.pkl", "tuner.pkl cannot be read (UnpicklingError"),
    ("no experiment state", "no experiment_state-*.json is there"),
    ("torn experiment state", "experiment_state-2026-11-28_10-00-00.json cannot be read (JSONDecodeError"),
])
def test_a_sweep_whose_tune_state_is_gone_or_damaged_is_refused_not_run_twice(tmp_path, damage, why):
    """With Ray Tune's tuner.pkl deleted a relaunch started every trial again beside the recorded ones
    ("4/2 trials started", duplicate rows everywhere); a damaged one gave an UnpicklingError
    traceback after Ray had started. Both now stop before Ray starts, naming the file."""
    import ray.cloudpickle

    from sweeper.loading import load_sweep
    from sweeper.records import SweepRecord
    from sweeper.spaces import space_signature

    space = tmp_path / "twice.py"
    space.write_text('"""Does lr matter?"""\nfrom ray import tune\nfrom sweeper.spaces import Sweep\n'
                     'SWEEP = Sweep(name="twice", space={"data.name": "digits", "model.arch": "smallcnn", '
                     '"optim.lr": tune.grid_search([0.01, 0.1])}, max_epochs=1)\n')
    sweep, text = load_sweep(space, [f"storage={tmp_path}/store"])
    exp = tmp_path / "store" / "twice"
    record = SweepRecord(exp)
    record.create({"name": "twice", "signature": space_signature(sweep)}, text)
    (exp / "tuner.pkl").write_bytes(ray.cloudpickle.dumps({"a": "stand-in for Ray's state"}))
    state = exp / "experiment_state-2026-11-28_10-00-00.json"
    state.write_text('{"trial_data": [], "runner_data": {}}')
    if damage == "no tuner.pkl":
        (exp / "tuner.pkl").unlink()
    elif damage == "garbage tuner.pkl":
        (exp / "tuner.pkl").write_bytes(b"\x80\x05 not a pickle")
    elif damage == "no experiment state":
        state.unlink()
    else:
        state.write_text('{"trial_data": [["{\\"trial')

    # No trial recorded yet: starting afresh repeats nothing, so the dry run passes.
    out = sweeper("launch", str(space), "--dry-run", "--local", "--storage", f"{tmp_path}/store")
    assert out.returncode == 0, out.stderr
    record.write_trial("t1", {"trial_id": "t1", "name": "smallcnn-lr0.01", "status": "running"})
    for extra in (["--dry-run"], []):
        out = sweeper("launch", str(space), "--local", "--num-cpus", "1", "--storage", f"{tmp_path}/store",
                      *extra)
        text = " ".join(out.stderr.split())
        assert out.returncode == 2, (extra, out.stdout, out.stderr)
        assert f"sweep 'twice' records 1 trial(s), but Ray Tune's saved state in {exp} cannot resume it" in text
        assert why in text and "launch it under another --name" in text, text
        assert f"or remove {exp} to start this name afresh" in text, text
        assert "Traceback" not in out.stderr and "starting sweep" not in out.stdout
    assert "session_" not in " ".join(p.name for p in tmp_path.rglob("*"))  # no Ray was started
    assert [t["trial_id"] for t in record.trials()] == ["t1"]


def test_ui_of_a_named_sweep_opens_the_store_its_launch_recorded(tmp_path):
    """`ui NAME` looked for mlflow.db beside --storage only: a sweep on an s3:// storage keeps its
    embedded store in ./sweeps of the directory it was launched from, so ui refused it from anywhere
    else while status named the store; a sweep tracked on a server got "no MLflow store"."""
    from sweeper.records import SweepRecord

    record = SweepRecord(tmp_path / "store" / "far")
    elsewhere = tmp_path / "launched-from" / "sweeps" / "mlflow.db"
    record.create({"name": "far", "sweep_uid": "u", "tracking_uri": f"sqlite:///{elsewhere}",
                   "tracking_default": False, "experiment_dir": str(tmp_path / "store" / "far")}, "")
    from conftest import free_port

    out = sweeper("ui", "far", "--storage", str(tmp_path / "store"), "--port", str(free_port()))
    text = " ".join(out.stderr.split())
    assert out.returncode == 2 and f"no MLflow store at {elsewhere}: `sweeper sync far --storage {tmp_path / 'store'}` " \
        "writes sweep 'far''s runs there" in text, text
    record.update_meta(tracking_uri="http://***@mlflow.lab:5000")
    out = sweeper("ui", "far", "--storage", str(tmp_path / "store"), "--port", str(free_port()))
    text = " ".join(out.stderr.split())
    assert out.returncode == 2 and "sweep 'far' records its runs in http://***@mlflow.lab:5000" in text, text
    assert "open that server's UI" in text and "Traceback" not in out.stderr


def test_hints_that_name_a_path_with_a_space_can_be_pasted(tmp_path, monkeypatch):
    """"give its name and storage: sp.1 --storage rel dir/st" and "pass --storage /x/rel dir/st to
    resume it" were not commands a shell runs as meant; resume_command already quoted."""
    from sweeper.spaces import name_problem

    assert "give its name and storage: sp.1 --storage 'rel dir/st'" in name_problem("rel dir/st/sp.1")
    first = tmp_path / "rel dir" / "st"
    err = _two_sweeps_named_taken(first, tmp_path / "cwd", tmp_path, monkeypatch)
    assert f"or --storage '{first}' to say which" in err.value.problems[0]


def test_a_reader_that_closes_the_pipe_early_is_no_internal_error(tmp_path):
    """`sweeper status NAME | head -1` exited 1 (rich's default on a broken pipe), which the exit
    statuses call an internal error; a launch printing into a closed pipe would have ended mid-sweep.
    The rest of the output is dropped and the command ends as it would have."""
    from sweeper.records import SweepRecord

    SweepRecord(tmp_path / "piped").create({"name": "piped", "planned_trials": 1}, "")
    # A reader that has closed its end before anything is written: the first write fails, every time.
    script = (f"{sys.executable} -m sweeper.cli status piped --storage '{tmp_path}' | (exec <&-; sleep 2); "
              "exit ${PIPESTATUS[0]}")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
