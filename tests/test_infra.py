"""The deployment files under infra/: each parses, and they agree with each other and with the project.

Checks are functions that return a list of problems, so that each test can also show that its check
fails on a broken input (a changed pin, a public port, a missing token mode, an option the CLI lacks).
No Ray cluster, no network, no docker: only parsing, plus Ray's and MLflow's own validators.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
RAY_PORTS = {6379, 8265, 10001}
SWEEPER_IMAGE = "registry.example.com/sweeper"


# ---- reading ------------------------------------------------------------------------------------------


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load(rel: str):
    docs = yaml_docs(INFRA / rel)
    return docs[0] if len(docs) == 1 else docs


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def strings(obj):
    """Every string inside a parsed YAML/JSON document."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def readme_blocks() -> list[str]:
    """infra/README.md's indented code blocks, each as one text with continuation lines joined."""
    blocks, cur = [], []
    for line in (INFRA / "README.md").read_text().splitlines():
        if line.startswith("    "):
            cur.append(line[4:])
        elif cur and line.strip() == "":
            cur.append("")
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return [re.sub(r"\\\n\s*", " ", b) for b in blocks]


def shell_commands(text: str) -> list[list[str]]:
    """Simple commands of a shell text: split at ; && || | and newlines; `sh -c '...'` is opened."""
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        try:
            tokens = shlex.split(line, posix=True)
        except ValueError:
            continue
        cmd: list[str] = []
        for tok in tokens + [";"]:
            if tok in (";", "&&", "||", "|"):
                if cmd:
                    out.append(cmd)
                    for j in range(len(cmd) - 2):  # `sh -c '...'`, also after `ray job submit --`
                        if cmd[j] in ("sh", "bash") and cmd[j + 1] == "-c":
                            out += shell_commands(cmd[j + 2])
                cmd = []
            else:
                cmd.append(tok)
    return out


def all_command_texts() -> list[tuple[str, str]]:
    """(where, shell text) of every command in infra/ that a user or a node runs."""
    texts = [(f"README.md block {i}", b) for i, b in enumerate(readme_blocks())]
    launcher = load("ray-cluster.yaml")
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        texts += [(f"ray-cluster.yaml {key}", c) for c in launcher.get(key) or []]
    texts.append(("kuberay/rayjob.yaml entrypoint", load("kuberay/rayjob.yaml")["spec"]["entrypoint"]))
    texts.append(("tracking-compose.yaml mlflow",
                  load("tracking-compose.yaml")["services"]["mlflow"]["command"]))
    return texts


def sweeper_launches() -> list[tuple[str, list[str]]]:
    """(where, arguments after `sweeper launch`) for every such command in infra/."""
    out = []
    for where, text in all_command_texts():
        for cmd in shell_commands(text):
            for i in range(len(cmd) - 1):
                if cmd[i] == "sweeper" and cmd[i + 1] == "launch":
                    out.append((where, cmd[i + 2:]))
    return out


# ---- every file parses --------------------------------------------------------------------------------


def test_every_infra_file_parses_and_is_checked_here():
    known = {".yaml", ".yml", ".json", ".md", ".example", ".py", ".dockerignore", ".gitignore", ""}
    seen = []
    for path in infra_files():
        rel = path.relative_to(INFRA).as_posix()
        if path.suffix in (".yaml", ".yml"):
            assert yaml_docs(path), rel
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".py":
            compile(path.read_text(), rel, "exec")
        elif path.name.endswith("Dockerfile"):
            assert dockerfile(path)[0][0] == "FROM", rel
        else:
            assert path.suffix in known or path.name.endswith(".dockerignore"), f"unchecked file {rel}"
        seen.append(rel)
    for needed in ("ray-cluster.yaml", "Dockerfile", "tracking-compose.yaml", "tracking.Dockerfile",
                   "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/common.yaml",
                   "aws/s3-policy.json", "README.md", "tracking.env.example"):
        assert needed in seen, needed


def test_secrets_file_is_ignored():
    assert "tracking.env" in (INFRA / ".gitignore").read_text().split()


# ---- the cluster launcher against Ray's own schema ----------------------------------------------------


def ray_schema_path() -> Path:
    import ray.autoscaler

    return Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def test_ray_schema_is_where_ray_validate_config_reads_it():
    # ray.autoscaler._private.util.validate_config opens <ray/autoscaler>/ray-schema.json; if a Ray
    # upgrade moves it, this fails loudly instead of the launcher test silently checking nothing.
    path = ray_schema_path()
    assert path.is_file(), f"ray-schema.json moved: not at {path}"
    schema = json.loads(path.read_text())
    assert "available_node_types" in schema["properties"] and "docker" in schema["properties"]
    import inspect

    from ray.autoscaler._private import util

    assert '"ray-schema.json"' in inspect.getsource(util.validate_config)


def launcher_problems(config: dict) -> list[str]:
    import jsonschema

    schema = json.loads(ray_schema_path().read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=str)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_ray_cluster_yaml_validates_against_rays_schema():
    config = load("ray-cluster.yaml")
    assert launcher_problems(config) == []
    # and what `ray up` does before it talks to AWS: fill in defaults, merge commands, validate
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))
    broken = dict(config, docker=dict(config["docker"], imagee="typo"))
    assert launcher_problems(broken)
    broken = dict(config, available_node_types={"head": {"node_config": {}}})
    assert launcher_problems(broken)


def test_launcher_head_runs_no_trials_and_workers_have_gpus():
    config = load("ray-cluster.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["max_workers"] > 0 for t in workers)
    gpu_families = ("g4", "g5", "g6", "p3", "p4", "p5")
    assert any(t["node_config"]["InstanceType"].startswith(gpu_families) for t in workers)


# ---- pins ---------------------------------------------------------------------------------------------


def image_problems(pins: dict[str, str]) -> list[str]:
    problems = []
    ray_v, torch_v = pins["ray"], pins["torch"]
    want = f"{SWEEPER_IMAGE}:ray{ray_v}-torch{torch_v}"

    steps = dockerfile(INFRA / "Dockerfile")
    base = steps[0][1]
    if not re.fullmatch(rf"rayproject/ray:{re.escape(ray_v)}-py311-(gpu|cu\d+)", base):
        problems.append(f"Dockerfile FROM {base}: want rayproject/ray:{ray_v}-py311-cuXXX")
    runs = " ".join(a for i, a in steps if i == "RUN")
    copies = " ".join(a for i, a in steps if i == "COPY")
    if "constraints.txt" not in copies:
        problems.append("Dockerfile does not copy constraints.txt")
    for pkg in ("torch", "torchvision"):
        if not re.search(rf"pip install [^&]*-c constraints\.txt[^&]*\b{pkg}\b", runs):
            problems.append(f"Dockerfile does not install {pkg} through constraints.txt")
    if not re.search(r"pip install [^&]*-c constraints\.txt[^&]* \.(\s|$)", runs):
        problems.append("Dockerfile does not install the project through constraints.txt")
    if ("ENV", "RAY_AUTH_MODE=token") not in steps:
        problems.append("Dockerfile does not set RAY_AUTH_MODE=token")
    if f"{SWEEPER_IMAGE}:ray{ray_v}-torch{torch_v}" not in (INFRA / "Dockerfile").read_text():
        problems.append(f"Dockerfile's build command does not tag {want}")

    mlflow_base = dockerfile(INFRA / "tracking.Dockerfile")[0][1]
    if mlflow_base != f"ghcr.io/mlflow/mlflow:v{pins['mlflow']}":
        problems.append(f"tracking.Dockerfile FROM {mlflow_base}: want mlflow v{pins['mlflow']}")
    compose_image = load("tracking-compose.yaml")["services"]["mlflow"]["image"]
    if compose_image != f"sweeper-tracking:mlflow-{pins['mlflow']}":
        problems.append(f"tracking-compose mlflow image {compose_image}")

    used = [(f"ray-cluster.yaml docker.{k}", v) for k, v in load("ray-cluster.yaml")["docker"].items()
            if k.endswith("image")]
    for rel in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        doc = load(rel)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        if spec.get("rayVersion") != ray_v:
            problems.append(f"{rel}: rayVersion {spec.get('rayVersion')} != {ray_v}")
        for c in pod_containers(spec):
            used.append((f"{rel} container {c['name']}", c["image"]))
    for where, image in used:
        if image != want:
            problems.append(f"{where}: image {image}, want {want}")
    for rel in ("README.md",):
        for tag in re.findall(rf"{re.escape(SWEEPER_IMAGE)}:\S+", (INFRA / rel).read_text()):
            if tag != want:
                problems.append(f"{rel}: image {tag}, want {want}")
    readme_base = re.findall(r"rayproject/ray:[\w.-]+", (INFRA / "README.md").read_text())
    problems += [f"README.md names {t}, Dockerfile {base}" for t in readme_base if t != base]
    return problems


def pod_containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_images_and_versions_match_constraints():
    pins = constraints()
    assert {"ray", "torch", "torchvision", "mlflow"} <= set(pins)
    assert image_problems(pins) == []


@pytest.mark.parametrize("name", ["ray", "torch", "mlflow"])
def test_a_changed_pin_is_caught(name):
    pins = constraints()
    pins[name] = pins[name] + ".1"
    assert image_problems(pins), f"a changed {name} pin went unnoticed"


def test_pyproject_pins_the_tested_ray_minor():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the reference machine's)

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_dep = next(d for d in deps if d.startswith("ray["))
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(ray_dep.split("]", 1)[1])
    pinned = constraints()["ray"]
    assert pinned in spec
    major, minor = map(int, pinned.split(".")[:2])
    assert f"{major}.{minor + 1}.0" not in spec and f"{major}.{minor - 1}.0" not in spec, ray_dep


# ---- KubeRay ------------------------------------------------------------------------------------------


def test_kuberay_resources_use_the_crd_fields():
    cluster = load("kuberay/raycluster.yaml")
    job = load("kuberay/rayjob.yaml")
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    spec = job["spec"]
    assert set(spec) <= {"entrypoint", "submissionMode", "backoffLimit", "shutdownAfterJobFinishes",
                         "ttlSecondsAfterFinished", "rayClusterSpec", "runtimeEnvYAML",
                         "activeDeadlineSeconds", "submitterPodTemplate", "submitterConfig"}, spec
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1  # retries resume
    assert spec["shutdownAfterJobFinishes"] is True
    # one cluster definition: the RayJob's is the RayCluster's
    assert spec["rayClusterSpec"] == cluster["spec"]
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"  # the head runs no trials
    assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
               for g in cluster["spec"]["workerGroupSpecs"])
    # what the pods name exists in common.yaml
    common = {(d["kind"], d["metadata"]["name"]) for d in yaml_docs(INFRA / "kuberay/common.yaml")}
    for group in [head, *cluster["spec"]["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert ("ServiceAccount", pod["serviceAccountName"]) in common
        for vol in pod.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in common


def test_rayjob_retry_resumes():
    """A retried RayJob relaunches the same sweep: no --fresh, a stable name, the record on a volume."""
    entry = load("kuberay/rayjob.yaml")["spec"]["entrypoint"]
    (_, args), = [(w, a) for w, a in sweeper_launches() if w == "kuberay/rayjob.yaml entrypoint"]
    assert "--fresh" not in args
    records = [c for c in shell_commands(entry) if c[0] == "cd"]
    head = load("kuberay/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    assert records and records[0][1] in mounts, "the driver's record must live on the head's volume"
    # the README's launches run there too, not in Ray's per-upload copy of the working dir
    for where, text in all_command_texts():
        for cmd in shell_commands(text):
            if cmd[:2] == ["sweeper", "launch"]:
                assert ["cd", records[0][1]] in shell_commands(text), where


# ---- no public Ray ports ------------------------------------------------------------------------------


def exposure_problems(docs: list[tuple[str, dict]]) -> list[str]:
    problems = []
    for where, doc in docs:
        def walk(node, path=""):
            if isinstance(node, dict):
                if node.get("serviceType") in ("LoadBalancer", "NodePort"):
                    problems.append(f"{where}{path}: serviceType {node['serviceType']}")
                if node.get("type") in ("LoadBalancer", "NodePort") and "ports" in node:
                    problems.append(f"{where}{path}: Service type {node['type']}")
                if node.get("enableIngress") is True:
                    problems.append(f"{where}{path}: enableIngress")
                if "hostPort" in node and node.get("containerPort") in RAY_PORTS:
                    problems.append(f"{where}{path}: hostPort for {node['containerPort']}")
                for k, v in node.items():
                    walk(v, f"{path}.{k}")
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{path}[{i}]")
        walk(doc)
        if doc.get("kind") == "Ingress":
            problems.append(f"{where}: an Ingress")
    return problems


def security_group_problems(config: dict) -> list[str]:
    problems = []
    for rule in config.get("provider", {}).get("security_group", {}).get("IpPermissions", []):
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        ports = RAY_PORTS if lo == -1 else {p for p in RAY_PORTS if lo <= p <= hi}
        world = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + \
                [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if ports and any(c in ("0.0.0.0/0", "::/0") for c in world):
            problems.append(f"security group opens {sorted(ports)} to the world")
    return problems


def kube_docs() -> list[tuple[str, dict]]:
    return [(p.relative_to(INFRA).as_posix(), d) for p in sorted((INFRA / "kuberay").glob("*.yaml"))
            for d in yaml_docs(p)]


def test_no_public_ray_ports():
    assert exposure_problems(kube_docs()) == []
    launcher = load("ray-cluster.yaml")
    assert security_group_problems(launcher) == []
    head_cmds = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert not any("-p" == o.split()[0] or "--publish" in o for o in launcher["docker"]["run_options"])
    # the README reaches the job API only through a tunnel
    for where, text in all_command_texts():
        for cmd in shell_commands(text):
            if cmd[:3] == ["ray", "job", "submit"]:
                host = urlparse(cmd[cmd.index("--address") + 1]).hostname
                assert host in ("127.0.0.1", "localhost"), f"{where}: {cmd}"
    # the tracking stack publishes on 127.0.0.1 unless told otherwise
    for name, svc in load("tracking-compose.yaml")["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("${TRACKING_BIND_IP:-127.0.0.1}:") or port.startswith("127.0.0.1:"), \
                f"{name}: {port}"


def test_exposure_checks_can_fail():
    job = load("kuberay/rayjob.yaml")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    svc = {"apiVersion": "v1", "kind": "Service",
           "spec": {"type": "NodePort", "ports": [{"port": 8265}]}}
    assert len(exposure_problems([("job", job), ("svc", svc)])) == 2
    sg = {"provider": {"security_group": {"IpPermissions": [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}}}
    assert security_group_problems(sg)


# ---- token auth everywhere ----------------------------------------------------------------------------


def token_problems() -> list[str]:
    problems = []
    launcher = load("ray-cluster.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in launcher[key]:
            if "ray start" in cmd and "RAY_AUTH_MODE=token" not in cmd:
                problems.append(f"ray-cluster.yaml {key}: {cmd}")
    if "--env RAY_AUTH_MODE=token" not in launcher["docker"].get("run_options", []):
        problems.append("ray-cluster.yaml: the container does not get RAY_AUTH_MODE=token")
    if "~/.ray/auth_token" not in launcher.get("file_mounts", {}):
        problems.append("ray-cluster.yaml: the token file is not copied to the nodes")
    for rel in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        doc = load(rel)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        if (spec.get("authOptions") or {}).get("mode") != "token":
            problems.append(f"{rel}: authOptions.mode is not token")
        for c in pod_containers(spec):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if env.get("RAY_AUTH_MODE") != "token":
                problems.append(f"{rel} container {c['name']}: RAY_AUTH_MODE != token")
    for i, block in enumerate(readme_blocks()):
        exported = False
        for cmd in shell_commands(block):
            if cmd[:2] == ["export", "RAY_AUTH_MODE=token"]:
                exported = True
            starts = (cmd[:2] == ["ray", "start"] or cmd[:3] == ["ray", "job", "submit"]
                      or "launch" in cmd[1:2] and cmd[0] == "sweeper")
            inline = any(t == "RAY_AUTH_MODE=token" for t in cmd)
            if starts and not (exported or inline):
                problems.append(f"README.md block {i}: {' '.join(cmd)[:80]} without RAY_AUTH_MODE=token")
    return problems


def test_token_auth_everywhere_a_node_or_driver_starts():
    assert token_problems() == []
    # the README's ray job submit commands do export the mode (so the checks above ran on them)
    assert any(c[:3] == ["ray", "job", "submit"] for _, t in all_command_texts()
               for c in shell_commands(t))


# ---- sweeper launch commands against the real CLI -----------------------------------------------------


def launch_params():
    import typer

    from sweeper.cli import app

    # typer >= 0.2x vendors click (typer._click): duck-type the parameters instead of isinstance
    command = typer.main.get_command(app).commands["launch"]
    options = {}
    for p in command.params:
        if getattr(p, "param_type_name", None) == "option":
            for opt in p.opts + p.secondary_opts:
                options[opt] = p.is_flag
    return options


def launch_problems(args: list[str], options: dict[str, bool]) -> list[str]:
    problems, positional, i = [], [], 0
    values = {}
    while i < len(args):
        tok = args[i]
        if tok.startswith("-"):
            name, eq, value = tok.partition("=")
            if name not in options:
                problems.append(f"sweeper launch has no option {name}")
            elif not options[name] and not eq:
                if i + 1 >= len(args):
                    problems.append(f"{name} needs a value")
                else:
                    values[name] = args[i + 1]
                    i += 1
            elif not options[name]:
                values[name] = value
        else:
            positional.append(tok)
        i += 1
    if not positional:
        return problems + ["no search-space file"]
    file, overrides = positional[0], positional[1:]
    m = re.search(r"search_spaces/([\w.-]+\.py)$", file)
    if not m or not (ROOT / "search_spaces" / m.group(1)).is_file():
        problems.append(f"{file} is not a file in search_spaces/")
    problems += [f"override {o!r} is not KEY=VALUE" for o in overrides if "=" not in o]
    storage = values.get("--storage")
    if storage is None or urlparse(storage).scheme != "s3":
        problems.append(f"--storage {storage!r}: a cluster sweep needs an s3:// URI")
    if "--local" in args:
        problems.append("--local on a cluster")
    return problems


def test_every_sweeper_launch_in_infra_is_valid():
    options = launch_params()
    launches = sweeper_launches()
    assert len(launches) >= 3, launches
    assert len(options) > 5, options  # README launcher, README KubeRay, the RayJob
    for where, args in launches:
        assert launch_problems(args, options) == [], where


def test_launch_check_can_fail():
    options = launch_params()
    ok = ["search_spaces/vgg_depth.py", "--address", "auto", "--storage", "s3://b/p"]
    assert launch_problems(ok, options) == []
    assert launch_problems(["search_spaces/nope.py"] + ok[1:], options)
    assert launch_problems(ok + ["--adress", "x"], options)
    assert launch_problems(ok[:3] + ["--storage", "/tmp/sweeps"], options)
    assert launch_problems(ok + ["datasetdigits"], options)


def test_launch_overrides_are_accepted_by_the_search_space():
    """The RayJob's overrides load: a typo in a trial setting would fail the job only on the cluster."""
    from sweeper.loading import load_sweep

    for where, args in sweeper_launches():
        if where != "kuberay/rayjob.yaml entrypoint":
            continue
        options = launch_params()
        positional, i = [], 0
        extra = []
        while i < len(args):
            if args[i].startswith("-"):
                if args[i] == "--data-dir":
                    extra.append(f"data.dir={args[i + 1]}")
                i += 1 if options.get(args[i].split("=")[0]) else 2
                continue
            positional.append(args[i])
            i += 1
        name = re.search(r"search_spaces/([\w.-]+\.py)$", positional[0]).group(1)
        load_sweep(ROOT / "search_spaces" / name, positional[1:] + extra)


# ---- one bucket ---------------------------------------------------------------------------------------


def bucket_problems(storage_uris: list[str], policy: dict) -> list[str]:
    buckets = {urlparse(u).netloc for u in storage_uris}
    problems = [f"sweeps use several buckets: {sorted(buckets)}"] if len(buckets) > 1 else []
    named = set()
    for stmt in policy["Statement"]:
        res = stmt["Resource"] if isinstance(stmt["Resource"], list) else [stmt["Resource"]]
        named |= {r.split(":::", 1)[1].split("/", 1)[0] for r in res}
    if named != buckets:
        problems.append(f"aws/s3-policy.json grants {sorted(named)}, sweeps use {sorted(buckets)}")
    return problems


def storage_uris() -> list[str]:
    uris = []
    for _, args in sweeper_launches():
        for i, tok in enumerate(args):
            if tok == "--storage":
                uris.append(args[i + 1])
            elif tok.startswith("--storage="):
                uris.append(tok.split("=", 1)[1])
    return uris


def test_storage_is_one_s3_bucket_that_the_cluster_may_write():
    uris = storage_uris()
    assert uris and all(u.startswith("s3://") for u in uris)
    policy = json.loads((INFRA / "aws/s3-policy.json").read_text())
    assert bucket_problems(uris, policy) == []
    assert bucket_problems(uris + ["s3://other/x"], policy)
    # the README creates that bucket and the role the KubeRay pods use carries the policy
    bucket = urlparse(uris[0]).netloc
    assert f"aws s3 mb s3://{bucket}" in (INFRA / "README.md").read_text()


# ---- the tracking server ------------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    out = {}
    for line in (INFRA / "tracking.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def mlflow_server_args() -> list[str]:
    cmds = shell_commands(load("tracking-compose.yaml")["services"]["mlflow"]["command"])
    (server,) = [c for c in cmds if c[:3] == ["exec", "mlflow", "server"] or c[:2] == ["mlflow", "server"]]
    env = env_example()
    return [re.sub(r"\$\$\{(\w+)\}", lambda m: env.get(m.group(1), m.group(0)), a) for a in server]


def test_tracking_server_recipe():
    args = mlflow_server_args()
    opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the image installs psycopg2 (the same
    # driver tests/test_postgres.py runs the real server with), so the URI must name it.
    assert urlparse(opt["--backend-store-uri"]).scheme == "postgresql+psycopg2"
    assert "psycopg2-binary" in (INFRA / "tracking.Dockerfile").read_text()
    assert urlparse(opt["--backend-store-uri"]).hostname == "postgres"  # the compose service
    artifacts = urlparse(opt["--artifacts-destination"])
    assert artifacts.scheme == "s3"
    env = env_example()
    # the artifact bucket exists: make_buckets.py creates what MINIO_BUCKETS names
    assert artifacts.netloc in env["MINIO_BUCKETS"].split(",")
    compose = load("tracking-compose.yaml")
    assert compose["services"]["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in compose["services"]["postgres"]
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        assert not image.endswith(":latest") and ":" in image, f"{name}: unpinned image {image!r}"
    # every secret in the example is a placeholder to change
    for k in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert env[k].startswith("change-me"), k


def test_tracking_server_accepts_the_hosts_the_cluster_uses():
    """--allowed-hosts is matched against the whole Host header, port included (MLflow's own check)."""
    from mlflow.server.security_utils import is_allowed_host_header

    args = mlflow_server_args()
    allowed = [h.strip() for h in args[args.index("--allowed-hosts") + 1].split(",")]
    hosts = {"127.0.0.1:5000", "localhost:5000", "mlflow:5000"}
    for _, launch in sweeper_launches():
        if "--tracking-uri" in launch:
            hosts.add(urlparse(launch[launch.index("--tracking-uri") + 1]).netloc)
    assert len(hosts) > 3
    for host in sorted(hosts):
        assert is_allowed_host_header(allowed, host), f"the server would answer 403 to Host: {host}"
    # the recipe as it was (names without ports) rejected every client
    assert not is_allowed_host_header(["localhost", "127.0.0.1", "mlflow"], "127.0.0.1:5000")
