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
        assert init_ray(8) is False  # joined: the head's size, not the asked-for 8 CPUs
        assert ray.get_runtime_context().gcs_address == address
        assert ray.cluster_resources()["CPU"] == 1
        assert f"[ray] joined the running Ray head at {address}" in capsys.readouterr().out
        ray.shutdown()
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
