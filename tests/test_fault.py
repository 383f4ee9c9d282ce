"""Node loss: a 2-node Ray cluster (ray.cluster_utils.Cluster) loses the node of one training
worker mid-run; Ray Train restarts the worker group from the last checkpoint and the run finishes
with the plan's stage sequence, step count and data order, as an undisturbed run does.

`Cluster.add_node` must run on the main thread, so `train` runs in a thread; a
replacement node provides the capacity an autoscaler would (Train waits for 2 workers' worth of
CPU, and those start-up retries do not count against max_failures); every wait is bounded.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from training_helpers import committed_checkpoints, expected_tokens, read_metrics, run_config, write_scores

from pocl_ray.curriculum import plan_from_config, stage_specs

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("needs its own Ray cluster; a Ray session is already running in this process")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker_node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        yield cluster, worker_node
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_node_removed_mid_run_resumes_from_checkpoint(two_node_cluster, tiny_assets, tmp_path):
    from pocl_ray.training.driver import train

    cluster, worker_node = two_node_cluster
    scores = write_scores(tmp_path, tiny_assets)
    # No dev set: the claim is the restart's steps and data, and no dev decoding slows the run down.
    cfg = run_config(tiny_assets, tmp_path / "run", name="fault", **{"training.max_failures": 3, "data.dev": None})
    storage = tmp_path / "run" / "train" / "checkpoints" / cfg.name
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = train(cfg, scores)
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not committed_checkpoints(storage) and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert thread.is_alive() and committed_checkpoints(storage), f"no checkpoint before the run ended: {outcome}"

    removed_at = time.time()
    cluster.remove_node(worker_node)  # one of the two workers lived there
    cluster.add_node(num_cpus=1)  # the replacement capacity an autoscaler would bring
    thread.join(timeout=420)
    assert not thread.is_alive(), "the run did not finish within 7 minutes of losing a node"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]

    num_rows = pq.read_metadata(scores / "rows.parquet").num_rows
    specs = stage_specs(plan_from_config(cfg), num_rows, cfg.training.global_batch_size)
    records = read_metrics(result.metrics_path)
    # Same stage sequence, step count and per-step rows as the plan (what an undisturbed run does).
    assert [r["step"] for r in records] == list(range(1, sum(s.steps for s in specs) + 1))
    assert [r["stage"] for r in records] == [i for i, s in enumerate(specs) for _ in range(s.steps)]
    assert [r["tokens"] for r in records] == expected_tokens(cfg, scores)
    assert result.stages_completed == len(specs)
    # Progress up to the last checkpoint survived; the steps after it were trained again, after the loss.
    kept = [r["step"] for r in records if r["time"] < removed_at]
    assert kept and kept == list(range(1, len(kept) + 1)) and len(kept) < len(records)
    stage_ends = np.cumsum([s.steps for s in specs]).tolist()
    assert kept[-1] % cfg.training.checkpoint_every == 0 or kept[-1] in stage_ends
