"""A catalogue of bad inputs: each is refused with exit code 2 and one clear first line, before Ray.

One row per case: ``(id, command line, text the first problem line must contain)``. The command line
is what a user types after ``sweeper``, split like a shell would; ``{S}`` stands for this directory's
``spaces/`` (small bad search-space files, one per mistake) and leading ``NAME=value`` words are
environment variables. Every case runs the real CLI in-process (typer's CliRunner on
``sweeper.cli.app``) in an empty working directory and checks that:

- the exit code is 2 and no traceback was printed;
- the first line on stderr is a problem (``error: ...`` from ``launch``/``debug``, or the
  ``"{file}: N problem(s)"`` header of a ``validate`` block), and the first problem line (``error: ...``
  or ``"  - ..."``) contains the expected text: file name, line and error type where the file is at fault;
- Ray was not started (``ray.is_initialized()`` is False and no ``/tmp/ray/session_*`` of this process
  appeared), nothing was written in the working directory (no ``sweeps/``, no ``mlflow.db``), no
  space module was left in ``sys.modules`` and the SIGALRM handler is what it was.

To add a case: drop a file in ``spaces/`` if it needs one, and add a row.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from sweeper.cli import app

SPACES = Path(__file__).parent / "spaces"
TIMEOUT = "SWEEPER_LOAD_TIMEOUT=1"

CASES = [
    # ---- the file cannot be read or is not Python -------------------------------------------------
    ("missing_file", "launch {S}/no_such_space.py --local", "no_such_space.py: search-space file does not exist"),
    ("missing_file_typo", "validate {S}/good_optuan.py", "good_optuan.py: search-space file does not exist; did you mean '"),
    ("directory", "validate {S}", "spaces: is a directory, not a search-space file (it holds "),
    ("json_file", "launch {S}/sweep.json --dry-run", "sweep.json: is a .json file, not a Python search-space file; a search space is a Python file (.py)"),
    ("non_utf8", "validate {S}/latin1.py", "latin1.py:1: UnicodeDecodeError: byte 0xe9 at column 25 is not UTF-8"),
    ("nul_byte", "validate {S}/nul_byte.py", "nul_byte.py:2: SyntaxError: source code string cannot contain null bytes"),
    ("not_python", "validate {S}/not_python.py", "not_python.py:1: SyntaxError: invalid syntax"),
    ("syntax_error", "validate {S}/syntax_error.py", "syntax_error.py:4: SyntaxError: '(' was never closed"),
    ("indentation_error", "launch {S}/indentation_error.py --dry-run", "indentation_error.py:3: IndentationError: unexpected indent"),
    # ---- the file raises, exits or hangs while it is loaded -----------------------------------------
    ("missing_module", "launch {S}/missing_module.py --dry-run", "missing_module.py:3: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("wrong_keyword", "validate {S}/wrong_keyword.py", "wrong_keyword.py:4: TypeError: Sweep.__init__() got an unexpected keyword argument 'metrics'; did you mean 'metric'?"),
    ("loguniform_zero", "validate {S}/loguniform_zero.py", "loguniform_zero.py:6: ValueError: LogUniform requires a lower bound greater than 0"),
    ("quniform_indivisible", "launch {S}/quniform_indivisible.py --local", "quniform_indivisible.py:5: ValueError: Your upper variable bound 1 is not divisible"),
    ("raises_in_helper", "validate {S}/raises_in_helper.py", "raises_in_helper.py:6: RuntimeError: no widths configured"),
    ("sys_exit", "validate {S}/sys_exit.py", "sys_exit.py:3: SystemExit: called sys.exit(0) while being loaded"),
    ("sys_exit_local", "launch {S}/sys_exit.py --local", "sys_exit.py:3: SystemExit: called sys.exit(0) while being loaded"),
    ("sys_exit_debug", "debug {S}/sys_exit.py", "sys_exit.py:3: SystemExit: called sys.exit(0) while being loaded"),
    # os._exit ends a process with nothing to catch: validate exited 0 in silence, checking no more files.
    ("os_exit", "validate {S}/os_exit.py {S}/good.py", "os_exit.py:3: called os._exit(0) while being loaded"),
    ("os_exit_local", "launch {S}/os_exit.py --local", "os_exit.py:3: called os._exit(0) while being loaded"),
    ("keyboard_interrupt", "validate {S}/keyboard_interrupt.py", "keyboard_interrupt.py:3: KeyboardInterrupt: interrupted while being loaded"),
    ("endless_loop", f"{TIMEOUT} validate {{S}}/endless_loop.py", "endless_loop.py:3: TimeoutError: took longer than 1 s to load (an endless loop at import?)"),
    ("endless_loop_local", f"{TIMEOUT} launch {{S}}/endless_loop.py --local", "endless_loop.py:3: TimeoutError: took longer than 1 s to load"),
    ("bad_load_timeout", "SWEEPER_LOAD_TIMEOUT=soon validate {S}/good.py", "SWEEPER_LOAD_TIMEOUT='soon' must be a number of seconds >= 0"),
    ("resources_raise", "validate {S}/resources_raise.py", "resources_raise.py:7: resources(config of vgg11) raised KeyError: 'vgg11'"),
    ("resources_raise_local", "launch {S}/resources_raise.py --local", "resources_raise.py:7: resources(config of vgg11) raised KeyError: 'vgg11'"),
    # ---- no single Sweep ----------------------------------------------------------------------------
    ("no_sweep", "validate {S}/no_sweep.py", "no_sweep.py: must define exactly one Sweep (e.g. SWEEP = Sweep(...)); found 0"),
    ("empty_file", "launch {S}/empty.py --dry-run", "empty.py: must define exactly one Sweep (e.g. SWEEP = Sweep(...)); found 0"),
    ("sweep_not_a_sweep", "validate {S}/sweep_not_a_sweep.py", "sweep_not_a_sweep.py: SWEEP is a dict, not a Sweep"),
    ("two_sweeps", "validate {S}/two_sweeps.py", "two_sweeps.py: must define exactly one Sweep (e.g. SWEEP = Sweep(...)); found 2 (SWEEP, OTHER)"),
    # ---- metric and mode ------------------------------------------------------------------------------
    ("unknown_metric", "launch {S}/unknown_metric.py --local", "unknown_metric.py: metric='val_acc' is not a metric every trial reports each epoch; did you mean 'val_accuracy'?"),
    ("final_epoch_metric", "validate {S}/final_epoch_metric.py", "final_epoch_metric.py: metric='test_accuracy' is not a metric every trial reports each epoch; test metrics exist only after the last epoch"),
    ("metric_override", "launch {S}/good.py --dry-run metric=accuracy", "metric='accuracy' is not a metric every trial reports each epoch; did you mean 'val_accuracy'?"),
    ("mode_contradicts_metric", "validate {S}/mode_contradicts_metric.py", "mode_contradicts_metric.py: mode='max' contradicts metric='val_loss', which is better lower: mode='max' would keep the worst trials"),
    ("mode_override", "launch {S}/good.py --dry-run mode=min", "mode='min' contradicts metric='val_accuracy', which is better higher"),
    # ---- domains, under the search that samples them ----------------------------------------------------
    ("empty_choice", "validate {S}/empty_choice.py", "empty_choice.py: space['model.init']=choice([]) has nothing to choose from"),
    ("reversed_randint", "launch {S}/reversed_randint.py --dry-run", "reversed_randint.py: space['model.depth']=randint(20, 11) needs lower < upper, got lower=20 > upper=11"),
    ("equal_bounds", "validate {S}/equal_bounds.py", "equal_bounds.py: space['optim.momentum']=uniform(0.5, 0.5) needs lower < upper, got lower=0.5 = upper=0.5"),
    ("reversed_loguniform_random", "validate {S}/reversed_loguniform_random.py", "reversed_loguniform_random.py: space['optim.lr']=loguniform(0.1, 0.001) needs lower < upper, got lower=0.1 > upper=0.001 (swap them: loguniform(0.001, 0.1))"),
    ("reversed_loguniform_optuna", "launch {S}/reversed_loguniform_optuna.py --local", "reversed_loguniform_optuna.py: space['optim.lr']=loguniform(0.1, 0.001) needs lower < upper"),
    ("sample_from_optuna", "validate {S}/sample_from_optuna.py", "sample_from_optuna.py: space['optim.lr']=sample_from(<lambda> at sample_from_optuna.py:5): search='optuna' cannot convert tune.sample_from"),
    ("grid_optuna", "validate {S}/grid_optuna.py", "grid_optuna.py: search='optuna' cannot expand grid axes ['model.init']"),
    ("grid_optuna_override", "launch {S}/good.py --dry-run search=optuna", "search='optuna' cannot expand grid axes ['model.arch']"),
    ("randn_optuna", "validate {S}/randn_optuna.py", "randn_optuna.py: space['optim.momentum']=randn(0.9, 0.01): search='optuna' cannot sample a normal distribution"),
    ("qloguniform_optuna", "validate {S}/qloguniform_optuna.py", "qloguniform_optuna.py: space['optim.lr']=qloguniform(0.001, 0.1, 0.001): search='optuna' drops the step q=0.001"),
    ("qlograndint_optuna", "validate {S}/qlograndint_optuna.py", "qlograndint_optuna.py: space['data.batch_size']=qlograndint(16, 256, 16): search='optuna' cannot step a log-scaled integer"),
    ("object_choice_optuna", "validate {S}/object_choice_optuna.py", "object_choice_optuna.py: space['model.init']=choice(['he', ('normal', 0.01)]): search='optuna' can store only None, bool, int, float or str choices, not tuple"),
    # ---- settings ---------------------------------------------------------------------------------------
    ("unknown_setting", "validate {S}/unknown_setting.py", "unknown_setting.py: space: unknown setting 'optim.learning_rate'; did you mean 'optim.lr'?"),
    ("unknown_setting_override", "launch {S}/good.py --dry-run model.bn=true", "unknown setting 'model.bn'; did you mean 'model.batch_norm'?"),
    ("sweep_field_in_space", "validate {S}/sweep_field_in_space.py", "sweep_field_in_space.py: space['max_epochs'] is a Sweep setting, not a trial setting"),
    ("space_not_a_dict", "validate {S}/space_not_a_dict.py", "space_not_a_dict.py: space must be a dict of 'section.name' -> value or tune domain, not list"),
    ("bad_values", "validate {S}/bad_values.py", "bad_values.py: space: model.init='kaiming2' is not one of ['default', 'he', 'normal', 'xavier']"),
    ("bad_resources", "validate {S}/bad_resources.py", "bad_resources.py: resources['tpu'] is not one of ['cpu', 'gpu']"),
    # ---- command-line overrides -----------------------------------------------------------------------
    ("override_syntax", "launch {S}/good.py --dry-run max_epochs", "override 'max_epochs' is not key=value"),
    ("override_value", "launch {S}/good.py --dry-run width=abc", "model.width='abc' is not a number"),
    ("override_value_validate", "validate {S}/good.py --set width=abc", "model.width='abc' is not a number"),
    ("bad_arch", "launch {S}/good.py --local model.arch=vgg99", "model.arch='vgg99' is not one of ['googlenet', "),
    ("negative_lr", "launch {S}/good.py --dry-run lr=-0.1", "optim.lr=-0.1 must be > 0"),
    ("max_epochs_zero", "launch {S}/good.py --local max_epochs=0", "max_epochs=0 must be an integer >= 1"),
    ("grace_over_max_epochs", "launch {S}/good.py --dry-run max_epochs=3 grace_period=5", "grace_period=5 must be <= max_epochs=3"),
    ("bad_name_option", "launch {S}/good.py --dry-run --name 'bad name!'", "name='bad name!' must be 1-100 letters, digits"),
    ("bad_name_override", "launch {S}/good.py --local name=../etc", "name='../etc' must be 1-100 letters, digits"),
    ("unknown_scheduler", "launch {S}/good.py --dry-run scheduler=hyperband", "scheduler='hyperband' is not one of ['asha', 'fifo']"),
    ("unknown_search", "launch {S}/good.py --dry-run search=bayes", "search='bayes' is not one of ['optuna', 'random']"),
    ("num_samples_zero", "launch {S}/good_optuna.py --dry-run num_samples=0", "num_samples=0 must be an integer >= 1"),
    # ---- launch: what a fresh local Ray would fail on, found before it starts -------------------------
    ("unwritable_storage", "launch {S}/good.py --local --storage /proc/sweeper-no-such-dir", "storage='/proc/sweeper-no-such-dir' is not writable"),
    ("missing_dataset", "launch {S}/good.py --local dataset=cifar10 data_dir=/nonexistent-sweeper-data", "dataset 'cifar10' not found in /nonexistent-sweeper-data"),
    ("impossible_resources", "launch {S}/too_many_cpus.py --local", "resources: a trial of smallcnn asks for 4096 CPU and 0 GPU, but no node has that much"),
    ("validate_unwritable_storage", "validate {S}/good.py storage=/proc/sweeper-nope", "storage='/proc/sweeper-nope' is not writable"),
    # --dry-run --local asks what the launch would about this machine (it printed a plan for these)
    ("dry_run_missing_dataset", "launch {S}/good.py --local --dry-run dataset=cifar10 data_dir=/nonexistent-sweeper-data", "dataset 'cifar10' not found in /nonexistent-sweeper-data"),
    ("dry_run_impossible_resources", "launch {S}/too_many_cpus.py --local --dry-run", "resources: a trial of smallcnn asks for 4096 CPU and 0 GPU, but no node has that much"),
    ("no_cluster_given", "launch {S}/good.py", "no Ray cluster given: pass --address ADDR (or set RAY_ADDRESS)"),
    ("ray_client_address", "launch {S}/good.py --address ray://head.example:10001", "--address ray://head.example:10001: Ray Client (ray://) would run the sweep's controller on the head"),
    ("ray_client_env", "RAY_ADDRESS=ray://10.0.0.1:10001 launch {S}/good.py", "Ray Client (ray://) would run the sweep's controller on the head (10.0.0.1)"),
    ("storage_query_typo", "launch {S}/good.py --local --storage s3://bucket/sweeps?endpoint_overide=http://127.0.0.1:9", "Unexpected query parameter in S3 URI: 'endpoint_overide' (the query pyarrow reads: for s3:// endpoint_override"),
    ("storage_query_typo_status", "status good --storage s3://bucket/sweeps?endpoint_overide=http://127.0.0.1:9", "storage URI s3://bucket/sweeps"),
    # ---- transfer: model.pretrained, init_from, init_layers, freeze (sweeper.transfer) ------------------
    ("freeze_value", "launch {S}/good.py --dry-run model.freeze=half", "model.freeze='half' is not one of 'none', 'backbone', 'all_but_last:N'"),
    ("freeze_too_deep", "launch {S}/good.py --local model.arch=vgg11 model.freeze=all_but_last:20", "model.freeze='all_but_last:20' keeps 20 blocks training, but model.arch='vgg11' has only 8 backbone blocks"),
    ("init_layers_value", "validate {S}/good.py --set model.init_layers=convs", "model.init_layers='convs' is not one of ['all', 'backbone', 'none', 'vgg_paper']"),
    ("vgg_paper_not_vgg", "launch {S}/good.py --dry-run model.init_from=a.pt model.init_layers=vgg_paper", "model.init_layers='vgg_paper' copies a VGG's first four convs and its head's linear layers; model.arch='smallcnn' is no VGG"),
    ("pretrained_and_init_from", "launch {S}/good.py --dry-run model.init_from=a.pt model.pretrained=b.pt", "model.pretrained='b.pt' and model.init_from='a.pt' are both set"),
    ("pretrained_unknown_name", "validate {S}/good.py --set model.arch=resnet18 --set model.pretrained=ResNet18_Weights.NOPE", "model.pretrained='ResNet18_Weights.NOPE' is not a torchvision weights name nor a file path (for model.arch='resnet18': ResNet18_Weights.IMAGENET1K_V1)"),
    ("pretrained_wrong_arch", "launch {S}/good.py --dry-run model.arch=vgg11 model.pretrained=ResNet18_Weights.IMAGENET1K_V1", "model.pretrained='ResNet18_Weights.IMAGENET1K_V1' is for another architecture: model.arch='vgg11' (batch_norm=False) takes VGG11_Weights.IMAGENET1K_V1"),
    ("pretrained_stem", "launch {S}/good.py --dry-run model.arch=resnet18 model.batch_norm=true model.pretrained=IMAGENET1K_V1", "model.pretrained='IMAGENET1K_V1' was trained with the ImageNet stem: set model.stem='imagenet'"),
    ("pretrained_not_cached", "TORCH_HOME=/nonexistent-sweeper-torch launch {S}/good.py --local model.arch=resnet18 model.stem=imagenet model.batch_norm=true width=1 model.pretrained=ResNet18_Weights.IMAGENET1K_V1", "model.pretrained='ResNet18_Weights.IMAGENET1K_V1': /nonexistent-sweeper-torch/hub/checkpoints/resnet18-f37072fd.pth is not in torch's cache, and sweeper never downloads weights"),
    ("pretrained_missing_file", "launch {S}/good.py --local model.pretrained=/nonexistent-sweeper/weights.pt", "model.pretrained='/nonexistent-sweeper/weights.pt': no such file or checkpoint"),
    ("init_from_missing_checkpoint", "launch {S}/good.py --local model.init_from=/nonexistent-sweeper/checkpoint_000001", "model.init_from='/nonexistent-sweeper/checkpoint_000001': no such file or checkpoint"),
    ("init_from_bad_reference", "validate {S}/good.py --set model.init_from=sweep:/best", "model.init_from='sweep:/best' is not a sweep reference 'sweep:NAME/REF'"),
    ("init_from_unknown_sweep", "launch {S}/good.py --local model.init_from=sweep:no_such_sweep/best", "model.init_from='sweep:no_such_sweep/best': no sweep named 'no_such_sweep' under"),
    ("tracking_uri_file_store_dry_run", "launch {S}/good.py --dry-run --tracking-uri file:///tmp/mlruns", "--tracking-uri 'file:///tmp/mlruns': MLflow 3 keeps its file store (a path or file: URI) in maintenance mode and refuses it"),
    ("tracking_uri_bad_scheme", "launch {S}/good.py --local --tracking-uri ftp://user:pw@host/mlflow", "--tracking-uri 'ftp://***@host/mlflow': MLflow has no tracking store for the scheme 'ftp'; use a sqlite:, postgresql:, mysql:, mssql:, http: or https: URI"),
    ("tracking_uri_env_bad_scheme", "MLFLOW_TRACKING_URI=htp://host:5000 launch {S}/good.py --local", "MLFLOW_TRACKING_URI 'htp://host:5000': MLflow has no tracking store for the scheme 'htp'"),
    ("sync_wait_nan", "sync some_sweep --wait nan", "--wait nan: seconds to keep retrying must be a number >= 0"),
    ("sync_wait_negative", "sync some_sweep --wait -1", "--wait -1.0: seconds to keep retrying must be a number >= 0"),
    ("init_from_in_choice", "launch {S}/init_from_choice.py --local", "space['model.init_from']=choice([None, 'sweep:vgg_a/best']): a sweep reference (sweep:NAME/REF) must be a fixed value or a tune.grid_search value"),
    # ---- found by a hostile-user pass (2026-11-26) ---------------------------------------------------
    ("int_setting_inf", "launch {S}/good.py --dry-run batch_size=inf", "data.batch_size=inf is not an integer"),
    ("int_setting_nan", "debug {S}/good.py data.limit=nan", "data.limit=nan is not an integer"),
    ("max_epochs_inf", "launch {S}/good.py --dry-run max_epochs=inf", "max_epochs=inf must be an integer >= 1"),
    ("question_not_text", "launch {S}/question_not_text.py --dry-run", "question=5 must be text"),
    ("question_not_text_validate", "validate {S}/question_not_text.py", "question=5 must be text"),
    ("storage_unknown_scheme", "launch {S}/good.py --local --storage ftp://host/x", "storage 'ftp://host/x': ftp:// is not a storage sweeper can use"),
    ("storage_scheme_case", "launch {S}/good.py --dry-run --storage S3://bucket/x", "storage 'S3://bucket/x': S3:// is not a storage sweeper can use"),
    ("storage_no_bucket", "status some_sweep --storage s3://", "storage 's3://' names no bucket"),
    ("storage_unknown_scheme_export", "export some_sweep --storage mem://x", "storage 'mem://x': mem:// is not a storage sweeper can use"),
    ("local_and_address", "launch {S}/good.py --local --address 127.0.0.1:1", "--local starts a fresh Ray on this machine and --address 127.0.0.1:1 connects to a cluster"),
    ("debug_resume_missing", "debug {S}/good.py --resume /nonexistent-sweeper/ckpt", "--resume /nonexistent-sweeper/ckpt: no trial checkpoint there"),
    ("ui_port_out_of_range", "ui --port 70000", "--port 70000: a TCP port is 1-65535"),
    ("ui_bad_host", "ui --host 999.1.1.1", "--host '999.1.1.1': not an address of this machine"),
    ("address_refused", "launch {S}/good.py --address 127.0.0.1:1", "could not reach the Ray cluster at '127.0.0.1:1' (--address): Connection refused within 5 s"),
    ("ray_address_refused", "RAY_ADDRESS=127.0.0.1:1 launch {S}/good.py", "could not reach the Ray cluster at '127.0.0.1:1' (RAY_ADDRESS)"),
    ("address_without_port", "launch {S}/good.py --address headnode", "--address 'headnode' is not a cluster address: give the head node's HOST:PORT"),
    ("num_cpus_zero", "launch {S}/good.py --local --num-cpus 0", "--num-cpus 0: the local Ray needs at least 1 CPU"),
    ("num_cpus_zero_dry_run", "launch {S}/good.py --dry-run --num-cpus 0", "--num-cpus 0: the local Ray needs at least 1 CPU"),
    ("num_cpus_negative", "launch {S}/good.py --local --num-cpus -1", "--num-cpus -1: the local Ray needs at least 1 CPU"),
    ("resources_on_the_command_line", "launch {S}/good.py --dry-run resources=2", "resources=2: resources is set in the search-space file only (Sweep(resources=...)), not on the command line"),
    ("seed_overflow", "debug seed=1e20 epochs=1", "seed=100000000000000000000 must be in [0, 4611686018427387904]"),
    ("seeds_past_the_largest_seed", "validate {S}/good.py -s seeds=3 -s seed=4611686018427387903", "seeds=3 from seed=4611686018427387903 reach seed 4611686018427387905"),
    ("num_samples_beyond_float_integers", "validate {S}/good.py -s num_samples=1e300", "num_samples=1e+300 must be an integer >= 1"),
    ("seeds_too_many", "validate {S}/good.py -s seeds=1e7", "x seed (10000000) x num_samples (1)): more than 100,000"),
    ("address_local", "launch {S}/good.py --address local", "--address local would start a fresh Ray on this machine: that is --local"),
    ("address_http", "launch {S}/good.py --address http://localhost:8265", "--address 'http://localhost:8265' is a URL, not a cluster address"),
    ("address_bare_ipv6", "launch {S}/good.py --address ::1", "--address '::1' is not a cluster address"),
    ("grid_too_large", "launch {S}/huge_grid.py --dry-run", "huge_grid.py: the sweep would run 100,000,000 trials (optim.lr (100) x optim.momentum (100)"),
]
if not __import__("torch").cuda.is_available():  # the mistake is asking for a GPU this machine lacks
    CASES.append(("device_cuda_without_gpu", "launch {S}/good.py --local --num-cpus 1 device=cuda",
                  "device='cuda': trials of vgg11 must run on a GPU, but this Ray cluster has none"))

_ENV_RE = re.compile(r"^[A-Z_][A-Z0-9_]*=")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_HEADER_RE = re.compile(r"^\S.*: \d+ problem\(s\)$")


def _ray_sessions() -> set[str]:
    try:
        return {n for n in os.listdir("/tmp/ray") if n.startswith("session_2")}
    except OSError:
        return set()


def _problem_lines(stderr: str) -> list[str]:
    lines = [_ANSI_RE.sub("", line) for line in stderr.splitlines()]
    return [line[len("error: "):] if line.startswith("error: ") else line[4:]
            for line in lines if line.startswith(("error: ", "  - "))]


def run_cli(command: str, tmp_path: Path, monkeypatch) -> tuple[object, list[str]]:
    """Run `sweeper COMMAND` in-process in an empty directory; check the invariants every refused
    input shares; return (result, problem lines)."""
    words = shlex.split(command.replace("{S}", str(SPACES)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("SWEEPER_LOAD_TIMEOUT", raising=False)
    while words and _ENV_RE.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    sessions, handler = _ray_sessions(), signal.getsignal(signal.SIGALRM)

    result = CliRunner().invoke(app, words)

    output = f"exit {result.exit_code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.exit_code == 2, f"{output}\n{result.exception!r}"
    assert "Traceback" not in result.stdout + result.stderr, output
    first = _ANSI_RE.sub("", result.stderr.splitlines()[0]) if result.stderr.strip() else ""
    assert first.startswith("error: ") or _HEADER_RE.match(first), output
    assert not ray.is_initialized()
    ours = [s for s in _ray_sessions() - sessions if s.endswith(f"_{os.getpid()}")]
    assert not ours, f"Ray started: {ours}"
    assert sorted(p.name for p in cwd.iterdir()) == [], "something was written in the working dir"
    assert not [m for m in sys.modules if m.startswith("_sweeper_space_")]
    assert signal.getsignal(signal.SIGALRM) == handler
    return result, _problem_lines(result.stderr)


@pytest.mark.parametrize("command,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_ray_with_one_clear_first_line(command, expected, tmp_path,
                                                                     monkeypatch):
    result, problems = run_cli(command, tmp_path, monkeypatch)
    assert problems and expected in problems[0], \
        f"expected {expected!r} in the first problem line:\n{result.stderr}"


def test_validate_reports_every_file_even_after_one_that_exits(tmp_path, monkeypatch):
    files = ["empty_choice.py", "good.py", "sys_exit.py", "endless_loop.py", "syntax_error.py"]
    command = f"{TIMEOUT} validate " + " ".join(f"{{S}}/{f}" for f in files)
    result, problems = run_cli(command, tmp_path, monkeypatch)
    headers = [line for line in result.stderr.splitlines() if _HEADER_RE.match(line)]
    assert [Path(h.split(":")[0]).name for h in headers] == [
        "empty_choice.py", "sys_exit.py", "endless_loop.py", "syntax_error.py"]
    assert all(h.endswith(": 1 problem(s)") for h in headers)
    assert "good.py: ok" in result.stdout and "dry run built" in result.stdout
    assert [p.split(": ")[0].rsplit("/", 1)[-1] for p in problems] == [
        "empty_choice.py", "sys_exit.py:3", "endless_loop.py:3", "syntax_error.py:4"]


def test_the_catalogue_covers_every_space_file_and_has_unique_ids():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) >= 35
    used = " ".join(c[1] for c in CASES)
    unused = [p.name for p in SPACES.iterdir() if p.name not in used]
    assert unused == [], f"space files no case uses: {unused}"


def test_a_fresh_process_survives_a_hung_file_between_good_ones(tmp_path):
    """In a new process the first imports (torch, Ray) happen while files load: the time limit must not
    interrupt them (a half-imported torch crashed the process at exit) nor count them against a file."""
    import subprocess

    env = {**os.environ, "SWEEPER_LOAD_TIMEOUT": "1"}
    env.pop("RAY_ADDRESS", None)
    files = [str(SPACES / f) for f in ("good.py", "endless_loop.py", "sys_exit.py", "good_optuna.py")]
    out = subprocess.run([sys.executable, "-m", "sweeper.cli", "validate", *files], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "good.py: ok" in out.stdout and "good_optuna.py: ok" in out.stdout, out.stdout + out.stderr
    assert "endless_loop.py:3: TimeoutError: took longer than 1 s" in out.stderr
    assert "sys_exit.py:3: SystemExit: called sys.exit(0)" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_problem_that_looks_like_markup_is_printed_as_text(tmp_path, monkeypatch):
    space = tmp_path / "markup.py"
    space.write_text('raise ValueError("closing [/b] tag")\n')
    result, problems = run_cli(f"launch {space} --dry-run", tmp_path, monkeypatch)
    assert "markup.py:1: ValueError: closing [/b] tag" in problems[0]


# ---- launch against a sweep that already exists (its record lives outside the working dir) ---------


def _existing_sweep(tmp_path: Path, *, signature_of: str = "good.py") -> Path:
    """A sweep record as a finished launch of spaces/good.py leaves it (no Ray needed)."""
    from sweeper.records import SweepRecord
    from sweeper.loading import load_sweep
    from sweeper.spaces import space_signature

    storage = tmp_path / "store"
    sweep, text = load_sweep(SPACES / signature_of)
    SweepRecord(storage / "good").create({"name": "good", "sweep_uid": "u", "planned_trials": 2,
                                          "signature": space_signature(sweep)}, text)
    return storage


# --dry-run printed a plan (exit 0) for each of these, which the launch then refused.
DRY = pytest.mark.parametrize("dry", ["", " --dry-run"])


@DRY
def test_a_changed_space_under_an_existing_name_is_refused_with_the_difference(tmp_path, monkeypatch,
                                                                                dry):
    storage = _existing_sweep(tmp_path)
    result, problems = run_cli(f"launch {{S}}/good.py --local --storage {storage} max_epochs=3 "
                               f"model.width=0.25{dry}", tmp_path, monkeypatch)
    text = " ".join(result.stderr.split())
    assert "sweep 'good' already exists with a different space" in problems[0]
    assert "~ model.width: 0.125 -> 0.25" in text and "~ sweep.max_epochs: 2 -> 3" in text
    assert "--name good-v2" in text and f"`sweeper resume good --storage {storage}`" in text


@DRY
def test_fresh_on_an_existing_name_is_refused(tmp_path, monkeypatch, dry):
    storage = _existing_sweep(tmp_path)
    result, problems = run_cli(f"launch {{S}}/good.py --local --fresh --storage {storage}{dry}",
                               tmp_path, monkeypatch)
    assert "sweep 'good' already exists in" in problems[0] and "--name" in problems[0]


def test_a_dry_run_of_an_existing_sweep_says_the_launch_would_resume_it(tmp_path, monkeypatch):
    storage = _existing_sweep(tmp_path)
    result = CliRunner().invoke(app, shlex.split(f"launch {SPACES}/good.py --dry-run --storage {storage}"))
    assert result.exit_code == 0, result.output
    assert "the launch would resume sweep 'good', which records 0 trial(s) already" in " ".join(
        result.output.split())


@DRY
def test_a_second_driver_is_refused_and_the_record_is_left_as_it_was(tmp_path, monkeypatch, dry):
    import json
    import socket

    from sweeper.lease import process_start_time

    storage = _existing_sweep(tmp_path)
    lease = storage / "good" / "sweeper" / "driver.json"
    lease.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "start_time": process_start_time(os.getpid()),
                                 "started": 1.0, "heartbeat": 2.0, "session_dir": None}))
    before = sorted(p.name for p in (storage / "good" / "sweeper").iterdir())
    result, problems = run_cli(f"launch {{S}}/good.py --local --storage {storage}{dry}", tmp_path,
                               monkeypatch)
    assert f"sweep 'good' is already running (driver pid {os.getpid()} on" in problems[0]
    assert "one driver per sweep" in problems[0]
    assert sorted(p.name for p in (storage / "good" / "sweeper").iterdir()) == before
    assert json.loads(lease.read_text())["pid"] == os.getpid()
