"""A real multi-node Ray cluster and an S3-compatible object store, both on this machine.

The cluster: `ray start --head` (no CPUs: it runs no trials, as on a real cluster) and two
`ray start --address` worker nodes, each its own process tree and node id, token authentication on
(a fresh token in RAY_AUTH_TOKEN). The store: moto's S3 server over HTTP on 127.0.0.1. Both are
started and ended by the tests, by pid: every process of the cluster names the fixture's own
--temp-dir on its command line.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import free_port

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _ray_start(args: list[str], env: dict) -> None:
    ray = Path(sys.executable).with_name("ray")
    out = subprocess.run([str(ray), "start", *args], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def pids_naming(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def end_processes_naming(needle: str) -> None:
    for _ in range(5):
        pids = pids_naming(needle)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(1)


class Cluster:
    def __init__(self, temp_dir: Path, env: dict):
        self.temp_dir, self.env = temp_dir, env
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start(self, workers: int = 2) -> "Cluster":
        _ray_start(["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false",
                    f"--temp-dir={self.temp_dir}", "--disable-usage-stats"], self.env)
        for _ in range(workers):
            self.add_worker()
        return self

    def add_worker(self) -> None:
        _ray_start([f"--address={self.address}", "--num-cpus=1", f"--temp-dir={self.temp_dir}",
                    "--disable-usage-stats"], self.env)

    def raylets(self) -> list[int]:
        """pids of the worker nodes' raylets (the head's is the one started with --head's port)."""
        return [pid for pid in pids_naming(str(self.temp_dir))
                if b"/raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]]

    def stop(self) -> None:
        end_processes_naming(str(self.temp_dir))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {**os.environ, **AWS, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    c = Cluster(tmp_path_factory.mktemp("ray"), env)
    try:
        yield c.start()
    finally:
        c.stop()


class S3Server:
    """moto's S3 server on 127.0.0.1 (its own process), and storage URIs in fresh buckets."""

    def __init__(self):
        self.port = free_port()
        self.proc = None

    def start(self, timeout: float = 60.0) -> "S3Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                      str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        end = time.time() + timeout
        while time.time() < end:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2)
                return self
            except OSError as exc:
                if getattr(exc, "code", None):  # an HTTP answer: it is up
                    return self
                time.sleep(0.3)
        raise RuntimeError("moto S3 server did not come up")

    def uri(self, path: str = "sweeps") -> str:
        bucket = f"sweeper-{uuid.uuid4().hex[:8]}"
        return (f"s3://{bucket}/{path}?endpoint_override=http://127.0.0.1:{self.port}"
                "&scheme=http&allow_bucket_creation=true")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()
