"""Log-probabilities as the losses compute them and the cached teacher stores them (pure torch).

Log-probs are floored at LOG_FLOOR, far below fp32's exp underflow (about -104), so masked vocabulary
entries (-inf logits) have probability exactly 0 and their 0·log0 terms evaluate to 0 with no inf-inf
or 0·inf reaching a value or a gradient. A token one side masks and the other supports (a truly
infinite divergence) then costs at most ~1e4 nats: large, finite, and summable over a batch. The
cached teacher floors what it stores at the same value, so a stored log-prob and a computed one mean
the same.
"""

from __future__ import annotations

import math

import torch

LOG_FLOOR = -1e4


def log_probs_(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) in fp32, floored at LOG_FLOOR, over the last dimension.

    In place when ``logits`` are fp32 (else in their fp32 copy): the caller gives the buffer up, and no
    (n, V) tensor is made beyond logsumexp's one temporary. Not differentiable by autograd.
    """
    x = logits.float()
    if temperature != 1.0:
        x.div_(temperature)
    # As torch.log_softmax: the max off first, then log Σ exp, so each step rounds on the smaller scale.
    x.sub_(x.amax(-1, keepdim=True))
    return x.sub_(torch.logsumexp(x, -1, keepdim=True)).clamp_min_(LOG_FLOOR)


def log_mix(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p·p + (1 − weight_p)·q), computed in log space."""
    if weight_p == 0.0:
        return logq
    if weight_p == 1.0:
        return logp
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))
