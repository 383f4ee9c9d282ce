"""End to end as users run it: `ray start --head` locked with Ray's token authentication, then `ray
job submit --working-dir` of the distill pipeline on a quickstart-sized config, then assertions on
everything it wrote, the MLflow store the quickstart logs to included (read back with MLflow's own
client); and a submission without the token is refused.

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
from tracker_stores import mlflow_children, mlflow_series

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
        # No drain on SIGTERM: by default the head drains its node for up to 30 s before it stops its
        # processes (for Serve replicas, which this head has none of); the teardown took those 30 s.
        env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
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
    """`ray job submit` the pipeline as a user does (it tails the job's logs until the job ends, then
    prints its status) and return that output; fail with its tail unless the job SUCCEEDED."""
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
    # The status `ray job submit` reads from the job server once the job ended (what `ray job status`
    # prints; another CLI process costs seconds).
    assert f"Job '{job_id}' succeeded" in output, f"--- job output ---\n{output[-8000:]}"
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
    # The same head runs a submission that carries the token: test_job_submit_runs_the_whole_pipeline's two jobs.


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
    _check_mlflow(out, live=True)

    # A second submission of the same config finds every step done and only rewrites the report; it
    # is a second pipeline run in MLflow, its stages logged from their files.
    again = _submit_and_wait(address, env, work, "pocl-e2e-again", tmp_path / "job2.log")
    assert again.count("skipped") >= 5, again[-3000:]
    _check_mlflow(out, live=False)


def _check_mlflow(out: Path, live: bool) -> None:
    """The quickstart's MLflow store (output.trackers: [mlflow], the default SQLite store beside the
    outputs) as a user opens it: the newest pipeline run, its config, its stages as children and their
    numbers equal to the files the run wrote. live: the compared runs trained in this invocation, so
    their steps reached MLflow while they trained (before selection.json was written)."""
    from mlflow.tracking import MlflowClient

    out = out.resolve()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")  # the config's name
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`pocl_ray.kind` = 'pipeline'")
    assert len(parents) == (1 if live else 2), [p.info.run_id for p in parents]
    parent = max(parents, key=lambda p: p.info.start_time)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "e2e"
    params = parent.data.params
    assert Path(params["models.teacher"]).resolve() == out / "teacher" and params["data.max_rows"] == "96"
    assert params["pipeline.compare.pocl.kd.teacher"] == "cached" and params["output.trackers"] == '["mlflow"]'
    artifacts = {a.path for folder in ("config", "report") for a in client.list_artifacts(parent.info.run_id, folder)}
    pngs = {f"report/{png.name}" for png in (out / "report").glob("*.png")}
    assert {"config/config.yaml", "report/report.md", *pngs} <= artifacts and pngs

    children = mlflow_children(client, parent.info.run_id)
    assert set(children) == {"teacher-prep", "score", "pocl", "baseline", "teacher"}
    assert {c.info.status for c in children.values()} == {"FINISHED"}
    manifest = json.loads((out / "scores" / "manifest.json").read_text())
    score = children["score"].data.metrics
    assert score["scoring/rows_in"] == 96 and score["scoring/rows_scored"] == manifest["rows_scored"]
    assert [score[f"scoring/bucket_{b['id']}/rows"] for b in manifest["buckets"]] == [
        b["rows"] for b in manifest["buckets"]
    ]
    prep = map(json.loads, (out / "teacher_prep" / "train" / "metrics.jsonl").read_text().splitlines())
    assert mlflow_series(client, children["teacher-prep"].info.run_id, "train/loss") == {
        r["step"]: r["loss"] for r in prep if not is_probe(r)
    }
    for label in ("pocl", "baseline"):
        run_id, run_dir = children[label].info.run_id, out / "runs" / label
        assert children[label].data.params["curriculum.plan"] == label
        lines = (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if not is_probe(r)]
        probes = [r for r in map(json.loads, lines) if is_probe(r)]
        for key in ("loss", "kd_loss", "ce_loss", "temperature", "kd_weight", "lr", "samples", "stage"):
            assert mlflow_series(client, run_id, f"train/{key}") == {r["step"]: r[key] for r in records}, key
        assert probes and mlflow_series(client, run_id, "probe/bucket_0/kd_loss") == {
            p["step"]: p["kd_loss"] for p in probes if p["bucket"] == 0
        }
        selection = json.loads((run_dir / "train" / "selection.json").read_text())
        assert mlflow_series(client, run_id, "dev/rougeL") == {
            c["step"]: c["dev_rougeL"] for c in selection["candidates"]
        }
        assert mlflow_series(client, run_id, "selected/step") == {selection["best"]["step"]: selection["best"]["step"]}
        history = client.get_metric_history(run_id, "train/loss")
        assert len(history) == len(records)  # each step logged once: live, or replayed, never both
        if live:
            written = (run_dir / "train" / "selection.json").stat().st_mtime
            assert max(m.timestamp for m in history) <= 1000 * written + 1
        results = json.loads((run_dir / "eval" / "results.json").read_text())
        metrics = children[label].data.metrics
        assert metrics["eval/kjv/rougeL"] == results["sets"]["kjv"]["rougeL_mean"]
        assert metrics["eval/kjv/rougeL_seed_10"] == results["sets"]["kjv"]["rougeL_per_seed"]["10"]
        assert {a.path for a in client.list_artifacts(run_id, "train")} >= {"train/plan.json", "train/selection.json"}
    teacher = json.loads((out / "runs" / "teacher" / "eval" / "results.json").read_text())
    assert children["teacher"].data.metrics["eval/kjv/ce"] == teacher["sets"]["kjv"]["ce_mean"]
