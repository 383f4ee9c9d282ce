"""The one rule that turns a run's seed into the seed of each random stream it uses.

Every stream is named by keys under a seed: a training step's torch seed (run seed, step, worker
rank), an on-policy row's sampling stream (step seed, row), an evaluation row's (eval seed, set
name, row id), a row's teacher-cache tail draws (0, "teacher_tail", row id), an extraction layer's
projection (extraction seed, teacher layer), a parity run's data and initialisation streams. The
seed of a stream is a function of its keys alone, so a restart, another batching or another worker
count draws the same numbers.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _entropy(key: int | str) -> int:
    # SeedSequence takes non-negative integers: a string key enters as the first 128 bits of its
    # SHA-256, a negative integer as its 64-bit two's complement.
    if isinstance(key, str):
        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:16], "little")
    return int(key) & (2**64 - 1)


def stream_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed fixed by (seed, *keys) alone: numpy's SeedSequence (a well-mixed hash, so nearby
    keys do not give nearby seeds) over the keys, its first 64-bit word shifted to 63 bits."""
    sequence = np.random.SeedSequence([_entropy(seed), *map(_entropy, keys)])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
