"""Counter-based random draws: u = H(request seed, position, layer, stream) in [0, 1).

Stateless, so a request's draws depend only on its own identity and the token position —
never on the batch it shares, the row it sits in, or the order in which requests arrive.
All arithmetic stays below 2**63 in int64, so it is exact on every torch backend.
"""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    # "lowbias32"-style finaliser; multipliers < 2**31 keep products < 2**63.
    h = h & _M32
    h = ((h ^ (h >> 16)) * 0x21F0AAAD) & _M32
    h = ((h ^ (h >> 15)) * 0x735A2D97) & _M32
    return h ^ (h >> 15)


def uniform(seed: torch.Tensor, position: torch.Tensor, layer: int, stream: int = 0) -> torch.Tensor:
    """Uniform [0, 1) float32 draws, one per element of ``seed``/``position`` (int64 tensors)."""
    h = _mix32(seed.to(torch.int64) ^ (stream * 0x9E3779B1 & _M32))
    h = _mix32(h ^ (position.to(torch.int64) & _M32))
    h = _mix32(h ^ ((layer * 0x85EBCA77) & _M32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def seed_from(*parts: object) -> int:
    """A stable 32-bit seed from arbitrary values (engine seed, request tag, ...)."""
    s = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(s, digest_size=4).digest(), "little")


# -- a request's seed: the same formula on every engine (docs/methods.md §0, "Random draws") ----

def prompt_identity(prompt_ids) -> int:
    """The identity of a request that brought none: its prompt tokens (never its batch row)."""
    return hash(tuple(prompt_ids))


def request_identity(prompt_ids, occurrence: int) -> int:
    """The identity the lm-eval model types give a request: its prompt and the occurrence of that
    prompt within the call (the repeats of one document draw different numbers)."""
    return seed_from(prompt_identity(prompt_ids), occurrence)


def request_seed(engine_seed: int, identity: object, sampling_seed: int | None) -> int:
    """The 32-bit seed of a request's counter-based draws (:func:`uniform`): the engine seed, the
    request's identity (:func:`request_identity`, or :func:`prompt_identity` when the caller gave
    none) and its own sampling seed. Every adapter seeds its requests here, so seeded random
    suppression and ERSS draw the same numbers on vLLM and on transformers."""
    return seed_from(engine_seed, identity, sampling_seed)


def candidate_seed(engine_seed: int, prompt_ids, occurrence: int, k: int, sampling_seed: int | None) -> int:
    """LRS: the sampling seed of candidate ``k`` of the ``occurrence``-th request with this prompt."""
    return seed_from(engine_seed, prompt_identity(prompt_ids), occurrence, k, sampling_seed)
