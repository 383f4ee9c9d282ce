"""Reading what the trackers stored, each through its own library (shared by test_tracking and the
pipeline test in test_sft_teacher)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def mlflow_children(client, parent_id: str) -> dict[str, object]:
    """name -> run of every MLflow run whose parent is `parent_id`."""
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
    )
    return {r.info.run_name: r for r in runs}


def mlflow_series(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the event files directly in log_dir (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def tensorboard_tags(log_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events.Tags()


# LevelDB's log format, which W&B's transaction log (run-<id>.wandb) uses after its 7-byte header.
_BLOCK = 32768
_HEADER = 7
_FULL, _LAST = 1, 4


def wandb_records(run_dir: Path) -> list:
    """Every record of an offline W&B run's transaction log, parsed with W&B's own protobuf schema.

    wandb 0.2x dropped its Python reader of this log (`wandb.sdk.internal.datastore`); the framing
    is LevelDB's log: 32 KiB blocks of chunks (crc32, length, type: FULL, FIRST, MIDDLE, LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", run_dir
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pending += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    """The rows an offline W&B run logged (`run.log`), in order."""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in wandb_records(run_dir)
        if r.WhichOneof("record_type") == "history"
    ]


def wandb_run_dirs(wandb_dir: Path) -> list[Path]:
    """The offline run folders W&B wrote under `dir` (dir/wandb/offline-run-*)."""
    return sorted((wandb_dir / "wandb").glob("offline-run-*"))
