"""Shared fixtures for the whole test suite.

- `ray_local` (module scope): a local Ray instance for the tests of one module, started with
  `ray.init(address="local", num_cpus=8, include_dashboard=False)` (address="local" so it never
  attaches to another cluster running on this machine; 8 logical CPUs on 2 cores so nested Ray
  Data / Train / Tune stages are not starved). Reused, and left running, when the test already runs
  inside an initialised Ray.
- `tiny_assets` (session scope): a `TinyAssets` with offline, deterministic files under one tmp dir:
    train_path / dev_path   JSONL rows {"id", "source", "instruction", "input", "output"} of a
                            synthetic, learnable instruction set (`synthetic_rows`): six task types
                            with exact answers whose difficulty grows with the input length;
                            `num_train` / `num_dev` rows.
    tokenizer_dir           byte-level BPE (`vocab_size` tokens, <|endoftext|> = eos/bos/pad,
                            ChatML chat template) trained on the templated rows.
    teacher_dir             Llama, hidden 64, 4 layers, random init (seed 0), tokenizer beside it.
                            Untrained: fine-tuning it here cost minutes on the shared 2 cores;
                            a test that needs a teacher better than chance trains one itself.
    student_dir             Llama, hidden 32, 2 layers, random init (seed 1) + tokenizer: a
                            narrower student, as in hidden-state extraction.
    cut_student_dir         teacher layers [1, 3] (`student_from_teacher`) + tokenizer.
  `data_config(**overrides)` gives a `DataConfig` on train_path with lengths that fit these rows.
- `synthetic_rows(n, seed)` is a plain function for tests that need their own rows.
- `s3` (session scope): an `S3Server`, moto's standalone S3 server (`ThreadedMotoServer`) on the
  loopback, reached as any S3-compatible store is: AWS_ENDPOINT_URL and fake AWS credentials in the
  environment for the session (Ray workers started later inherit them). `s3.bucket()` makes a fresh
  bucket and returns its s3:// URI; `s3.requests` is the server's request log, (method, path?query,
  status) per request, from moto's own (werkzeug) request logger.

Markers (pyproject.toml): `ray` (starts a local Ray), `e2e` (a Ray head and job submissions), `slow`.
`make test-fast` runs the tests without them. A test that uses a Ray fixture (`RAY_FIXTURES`),
directly or through another fixture, is marked `ray` here, so the marker cannot be forgotten; a test
without one of the three markers that calls `ray.init` anyway fails with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Ray Train starts a preemption watcher with every worker group: one more actor process, polling for node
# drains (cloud preemption notices), which the tests' local clusters never get. Off for every Ray the tests
# start (ray.init here; `ray start` heads and benchmark subprocesses inherit the environment): a minimal
# TorchTrainer fit took 21.8 s without it against 23.3 s with it (mean of 4 fits each, alternating runs).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

WORDS = (
    "apple river stone cloud green quick brown fox lazy dog bright moon silver tree small house "
    "north wind cold fire blue sea old road"
).split()

TASKS = ("reverse", "upper", "count", "add", "repeat", "sort")


def _task_row(task: str, rng: random.Random, size: int) -> tuple[str, str, str]:
    words = [rng.choice(WORDS) for _ in range(size)]
    if task == "reverse":
        return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))
    if task == "upper":
        return "Write the text in capital letters.", " ".join(words), " ".join(words).upper()
    if task == "count":
        return "How many words are in the text?", " ".join(words), str(size)
    if task == "add":
        a, b = rng.randrange(10**size), rng.randrange(10**size)
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    if task == "repeat":
        return f"Repeat the word '{words[0]}' {size} times.", "", " ".join([words[0]] * size)
    letters = sorted(rng.choice(WORDS)[: size + 1])
    return "Sort the letters alphabetically.", "".join(rng.sample(letters, len(letters))), "".join(letters)


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """n rows cycling through TASKS; input size (difficulty) 1..6 drawn per row; ids unique."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        instruction, context, output = _task_row(task, rng, rng.randint(1, 6))
        rows.append(
            {
                "id": f"{task}-{seed}-{i:04d}",
                "source": task,
                "instruction": instruction,
                "input": context,
                "output": output,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@dataclass(frozen=True)
class TinyAssets:
    root: Path
    train_path: Path
    dev_path: Path
    tokenizer_dir: Path
    teacher_dir: Path
    student_dir: Path
    cut_student_dir: Path
    num_train: int
    num_dev: int
    vocab_size: int

    def data_config(self, **overrides):
        from pocl_ray.config import DataConfig

        values = {"train": str(self.train_path), "dev": str(self.dev_path), "max_prompt_length": 96, "max_length": 128}
        return DataConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> TinyAssets:
    from pocl_ray.data import build_prompt
    from pocl_ray.models import build_tiny_model, build_tiny_tokenizer, student_from_teacher

    root = tmp_path_factory.mktemp("tiny_assets")
    train, dev = synthetic_rows(300, seed=0), synthetic_rows(60, seed=1)
    train_path = write_jsonl(root / "train.jsonl", train)
    dev_path = write_jsonl(root / "dev.jsonl", dev)
    vocab_size = 512
    texts = [build_prompt(r["instruction"], r["input"], "dolly") + r["output"] for r in train]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=vocab_size, save_dir=root / "tokenizer")
    assets = TinyAssets(
        root=root,
        train_path=train_path,
        dev_path=dev_path,
        tokenizer_dir=root / "tokenizer",
        teacher_dir=root / "teacher",
        student_dir=root / "student",
        cut_student_dir=root / "cut_student",
        num_train=len(train),
        num_dev=len(dev),
        vocab_size=vocab_size,
    )
    teacher = build_tiny_model(
        "llama",
        vocab_size,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        seed=0,
        save_dir=assets.teacher_dir,
        tokenizer=tokenizer,
    )
    build_tiny_model(
        "llama",
        vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        seed=1,
        save_dir=assets.student_dir,
        tokenizer=tokenizer,
    )
    student_from_teacher(teacher, keep_layers=[1, 3]).save_pretrained(assets.cut_student_dir)
    tokenizer.save_pretrained(assets.cut_student_dir)
    return assets


def put_in_hub_cache(hub_cache: Path, repo_id: str, commit: str, folder: Path, refs: tuple[str, ...]) -> None:
    """`folder`'s files as snapshot `commit` of `repo_id`, as huggingface_hub lays out its cache:
    content-addressed blobs, a snapshot of symlinks to them, refs naming the commit."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def local_ray(include_dashboard: bool):
    """A private local Ray session (never another process's cluster), shut down afterwards;
    an already running session is reused and left running."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=8, include_dashboard=include_dashboard)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    yield from local_ray(include_dashboard=False)


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one torch thread is ~10x faster than two contending ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Fixtures that start or hold a Ray session (test_tuning's `ray_tune` starts one with the dashboard).
RAY_FIXTURES = frozenset({"ray_local", "ray_tune"})
RAY_MARKERS = ("ray", "e2e", "slow")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _ray_only_in_marked_tests(request, monkeypatch) -> Iterator[None]:
    """`ray.init` fails in a test that carries none of RAY_MARKERS: `make test-fast` (which leaves
    those out) must start no Ray. Ray's own auto-init (a Ray Data or remote call without a session)
    goes through `ray.init` too."""
    if any(request.node.get_closest_marker(m) for m in RAY_MARKERS):
        yield
        return
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts Ray: mark it `ray` (or use the ray_local fixture)")

    monkeypatch.setattr(ray, "init", refuse)
    yield


# Fake credentials: never valid anywhere; the leak tests search outputs for them.
FAKE_AWS_KEY_ID = "AKIAPOCLRAYFAKEKEY01"
FAKE_AWS_SECRET = "pocl-ray-fake-secret-access-key-0000000"
_REQUEST_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3})')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class S3Server:
    endpoint: str
    requests: list[tuple[str, str, int]] = field(default_factory=list)

    def bucket(self) -> str:
        """A new, empty bucket: its s3:// URI."""
        import pyarrow.fs as pafs

        name = f"pocl-{uuid.uuid4().hex[:12]}"
        pafs.S3FileSystem(endpoint_override=self.endpoint, allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    def object_reads(self, prefix: str, since: int = 0) -> list[tuple[str, str, int]]:
        """The GETs of objects under `prefix` (bucket/key…; listings excluded) logged from request `since` on."""
        return [
            r
            for r in self.requests[since:]
            if r[0] == "GET" and r[1].lstrip("/").startswith(prefix) and "?" not in r[1]
        ]


class _RequestLog(logging.Handler):
    def __init__(self, server: S3Server):
        super().__init__(logging.INFO)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        match = _REQUEST_LINE.search(_ANSI.sub("", record.getMessage()))
        if match:
            self.server.requests.append((match[1], match[2], int(match[3])))


@pytest.fixture(scope="session")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    info = S3Server(endpoint=f"http://{host}:{port}")
    log = logging.getLogger("werkzeug")
    handler = _RequestLog(info)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the request lines go to the log above, not to pytest's output
    env = {
        "AWS_ENDPOINT_URL": info.endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_AWS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups on this machine
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        try:
            yield info
        finally:
            log.removeHandler(handler)
            log.propagate = True
            server.stop()
