"""End to end as users run it: `ray start --head` locked with Ray's token authentication, then `ray
job submit --working-dir` of the distill pipeline on a quickstart-sized config, then assertions on
everything it wrote; and a submission without the token is refused.

The head runs in its own process session and is stopped by signalling it alone at the end
(`ray stop` would stop every Ray cluster on the machine)."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest
import yaml
from conftest import free_port

from pocl_ray.probes import is_probe

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_head():
    # Short, not under pytest's tmp: Ray's Unix socket paths under it (session_<date>_<pid>/sockets/
    # dash_MetricsHead) must stay within 107 bytes, and a pytest basetemp under TMPDIR leaves too little.
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    port, dash = free_port(), free_port()
    # As in a shell with the virtual environment activated: the job's `python` is this interpreter.
    # The head and its clients share a token of this test's own (RAY_AUTH_TOKEN outranks the
    # ~/.ray/auth_token a local ray.init may have left), as `ray get-auth-token` hands a user one.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # Free ports for the services whose fixed defaults (52365, 10001, ...) another Ray on a
            # shared machine may hold: a head whose agent cannot bind never accepts a job.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--num-cpus=6",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the Ray head's job server did not come up in 180 s"
            time.sleep(3)
        yield address, env
    finally:
        # SIGTERM to `ray start --block` alone: it stops the processes it started, workers included
        # (a signal to the whole group races its clean-up and leaves workers behind).
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit_and_wait(address: str, env: dict, work: Path, job_id: str, log: Path, timeout: float = 1200) -> str:
    """`ray job submit` the pipeline as a user does (it tails the job's logs until the job ends) and
    return those logs; fail with their tail unless the job SUCCEEDED."""
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(work),
        "--submission-id",
        job_id,
        "--",
        "python",
        "pipelines/distill.py",
        "--config",
        "e2e.yaml",
    ]
    for _ in range(60):  # the job server can answer before the node's agent accepts jobs
        with log.open("w") as out:
            try:
                done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"job {job_id} did not end in {timeout:.0f} s; its output so far:\n{log.read_text()[-8000:]}"
                )
        output = log.read_text()
        if done.returncode == 0 or "No available agent" not in output:
            break
        time.sleep(5)
    status = subprocess.run(
        [RAY, "job", "status", "--address", address, job_id], env=env, capture_output=True, text=True
    )
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, (
        f"{status.stdout[-2000:]}{status.stderr[-2000:]}\n--- job output ---\n{output[-8000:]}"
    )
    return output


def _submit(address: str, env: dict, job_id: str, *command: str) -> subprocess.CompletedProcess:
    """`ray job submit` of a one-line command, retried while the node's agent is not up yet or the
    dashboard does not answer (on 2 busy cores it has dropped a connection now and then)."""
    args = [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--", *command]
    transient = ("No available agent", "Failed to connect to Ray at address")
    for _ in range(60):
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0 or not any(t in done.stdout + done.stderr for t in transient):
            return done
        time.sleep(5)
    return done


def test_a_submission_without_the_token_is_refused(ray_head, tmp_path):
    address, env = ray_head
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")} | {"HOME": str(home)}
    wrong = {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for job_id, client in (("no-token", no_token), ("wrong-token", wrong)):
        done = _submit(address, client, job_id, "python", "-c", "print('ran')")
        output = done.stdout + done.stderr
        assert done.returncode != 0 and "Authentication" in output, (job_id, output[-2000:])
        assert "ran" not in done.stdout
    listed = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "no-token" not in listed.stdout and "wrong-token" not in listed.stdout
    done = _submit(address, env, "with-token", "python", "-c", "print('ran with the token')")
    assert done.returncode == 0 and "ran with the token" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def _config(tmp_path: Path) -> dict:
    data = ROOT / "data" / "quickstart"
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["name"] = "e2e"
    cfg["data"].update(
        train=str(data / "train.jsonl"), dev=str(data / "dev.jsonl"), max_rows=96, max_prompt_length=64, max_length=96
    )
    cfg["models"]["teacher"] = str(tmp_path / "out" / "teacher")
    # The scoring pass also caches the teacher's top-32; the POCL run trains on that cache, no teacher.
    cfg["scoring"].update(max_new_tokens=8, teacher_top_k=32)
    cfg["pipeline"]["compare"]["pocl"]["kd.teacher"] = "cached"
    cfg["curriculum"].update(num_buckets=2, epochs_per_stage=1)
    cfg["training"].update(num_workers=1, global_batch_size=16, micro_batch_size=16, checkpoint_every=20)
    cfg["eval"].update(
        sets=[{"name": "kjv", "path": str(data / "test_kjv.jsonl"), "max_rows": 8}],
        seeds=[10],
        max_new_tokens=8,
        batch_size=8,
    )
    cfg["pipeline"]["prepare_teacher"].update(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, steps=8)
    cfg["output"]["dir"] = str(tmp_path / "out")
    return cfg


def test_job_submit_runs_the_whole_pipeline(ray_head, tmp_path):
    address, env = ray_head
    work = tmp_path / "job"
    shutil.copytree(ROOT / "pocl_ray", work / "pocl_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "pipelines", work / "pipelines")
    (work / "e2e.yaml").write_text(yaml.safe_dump(_config(tmp_path)))

    output = _submit_and_wait(address, env, work, "pocl-e2e", tmp_path / "job1.log")
    out = tmp_path / "out"
    assert "report written to" in output

    manifest = json.loads((out / "scores" / "manifest.json").read_text())
    assert manifest["rows_in"] == 96 == manifest["rows_scored"] + manifest["rows_rejected"]
    assert sum(b["rows"] for b in manifest["buckets"]) == manifest["rows_scored"]
    assert manifest["teacher_cache"]["top_k"] == 32

    for label, stages in (("pocl", [0, 1]), ("baseline", [0])):
        lines = (out / "runs" / label / "train" / "metrics.jsonl").read_text().splitlines()
        rows = [r for r in map(json.loads, lines) if not is_probe(r)]
        assert sorted({r["stage"] for r in rows}) == stages
        steps = [r["step"] for r in rows]
        assert steps == list(range(steps[0], steps[0] + len(steps))), "steps missing or repeated"
        results = json.loads((out / "runs" / label / "eval" / "results.json").read_text())
        for name, res in results["sets"].items():
            assert 0.0 <= res["rougeL_mean"] <= 100.0, (label, name, res)
        assert (out / "runs" / label / "train" / "student" / "config.json").is_file()
    pocl = pd.read_json(out / "runs" / "pocl" / "train" / "metrics.jsonl", lines=True)
    pocl = pocl[pocl["kind"] != "bucket_probe"] if "kind" in pocl else pocl
    assert pocl.groupby("stage")["temperature"].first().tolist() == [1.0, 2.0]
    assert (pocl["kd_loss"] > 0).all()  # KD against the cached teacher

    report = out / "report" / "report.md"
    text = report.read_text()
    pngs = sorted((out / "report").glob("*.png"))
    assert pngs, "the report has no plots"
    for png in pngs:
        assert png.name in text
        image = mpimg.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    assert "pocl" in text and "baseline" in text

    # A second submission of the same config finds every step done and only rewrites the report.
    again = _submit_and_wait(address, env, work, "pocl-e2e-again", tmp_path / "job2.log")
    assert again.count("skipped") >= 5, again[-3000:]
