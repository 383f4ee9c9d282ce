"""`ray_session.init_ray`: joins a live `ray start --head` on this machine, and starts (and sizes) its own
instance when the head's address file is stale (the head died without `ray stop`), where a plain
`ray.init(num_cpus=...)` fails with "When connecting to an existing cluster, num_cpus and num_gpus
must not be provided".

Each test points Ray's temp folder (RAY_TMPDIR) at its own short folder, so the address file and
sessions are private to it: other Ray users of this machine neither see the test's head nor get
seen by it. The head is stopped by SIGTERM to `ray start --block`, never `ray stop` (which stops
every Ray instance of the user on the machine).

The actor resource arguments are checked without Ray.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from conftest import free_port

from pocl_ray.ray_session import actor_resources, init_ray

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_tmpdir(monkeypatch):
    ray.shutdown()  # a session left by an earlier test module would be reused instead of tested
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield folder / "ray"
    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


def _local_instance_started(capsys, cpus: int) -> bool:
    """init_ray started (and sized) its own instance and said so in its one line."""
    started = init_ray(cpus, include_dashboard=False)
    return (
        started is True
        and ray.cluster_resources()["CPU"] == cpus
        and ("[ray] started a local Ray instance with" in capsys.readouterr().out)
    )


@pytest.mark.ray
def test_stale_address_file_starts_a_local_instance(ray_tmpdir, capsys):
    ray_tmpdir.mkdir(parents=True)
    (ray_tmpdir / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nobody listens there
    assert _local_instance_started(capsys, cpus=3)


def _init_ray_in_a_fresh_process(auth_mode: str | None) -> subprocess.CompletedProcess:
    code = (
        "import ray; from pocl_ray.ray_session import init_ray; started = init_ray(8); "
        "cpus = ray.cluster_resources()['CPU']; "
        "print(f'started={started} gcs={ray.get_runtime_context().gcs_address} cpus={cpus}')"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | (
        {"RAY_AUTH_MODE": auth_mode} if auth_mode else {}
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.ray
def test_joins_a_live_head_then_starts_its_own_once_it_was_killed(ray_tmpdir, capsys):
    port = free_port()
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        address_file = ray_tmpdir / "ray_current_cluster"
        while not address_file.is_file():  # written once the head's GCS is up
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the Ray head did not come up in 60 s"
            time.sleep(0.5)
        address = address_file.read_text().strip()  # the head's GCS, on this machine's address
        assert address.endswith(f":{port}")
        # `ray start --head` turns Ray's token authentication on: a shell without RAY_AUTH_MODE=token is
        # told so, one with it (as the README says) joins. Each in a fresh process: Ray fixes the mode
        # once per process, and this one's was fixed by whatever Ray call came first.
        refused = _init_ray_in_a_fresh_process(auth_mode=None)
        assert refused.returncode != 0
        assert f"ConfigError: the running Ray head at {address} requires Ray's token authentication" in refused.stderr
        assert "export RAY_AUTH_MODE=token" in refused.stderr
        joined = _init_ray_in_a_fresh_process(auth_mode="token")
        assert joined.returncode == 0, joined.stderr
        assert f"[ray] joined the running Ray head at {address}" in joined.stdout
        # Joined: the head's size, not the asked-for 8 CPUs.
        assert joined.stdout.splitlines()[-1] == f"started=False gcs={address} cpus=1.0"
    finally:
        # SIGTERM to `ray start --block` alone stops the processes it started.
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    assert (ray_tmpdir / "ray_current_cluster").is_file()  # left behind: no `ray stop`
    assert _local_instance_started(capsys, cpus=2)


def test_actor_resources_leave_out_the_cpu_ray_reserves_for_a_gpu_actor():
    assert actor_resources(1.0, 0.0) == {"num_cpus": 1.0}
    assert actor_resources(2.0, 0.0) == {"num_cpus": 2.0}
    assert actor_resources(1.0, 1.0) == {"num_gpus": 1.0}
    assert actor_resources(4.0, 0.5) == {"num_gpus": 0.5, "num_cpus": 4.0}
