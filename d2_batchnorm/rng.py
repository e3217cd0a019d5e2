"""
The random state of a training process, as one value that can be set aside and put back.

Code that runs inside a training without being part of it — PreciseBN's data loader and
forwards, evaluation — must not consume randomness the training would otherwise get:
otherwise the run with the hook trains differently from the run without it (different
augmentations, RoI samples, RoI-shuffle permutations), and a comparison of the two measures
the perturbation, not the hook. The state (:class:`RNGState`) covers every source such
code draws from:

* Python's ``random``, NumPy's global generator, torch's CPU generator and, once CUDA is
  initialized, every CUDA device's generator;
* the counters of :func:`next_shared_count` (e.g. :func:`d2_batchnorm.layers.shuffle_rois`
  derives its permutations from them, so all ranks agree without a broadcast).

:func:`preserved_rng_state` puts the state back after a block; :class:`RandomStream` gives
such code a private stream of its own.
"""
import hashlib
import random
from contextlib import contextmanager
from typing import Any, Dict, Hashable, NamedTuple, Optional

import numpy as np
import torch

__all__ = [
    "RNGState",
    "get_rng_state",
    "set_rng_state",
    "preserved_rng_state",
    "RandomStream",
    "derive_seed",
    "next_shared_count",
]

# Calls so far per key of next_shared_count.
_SHARED_COUNTS: Dict[Hashable, int] = {}


def derive_seed(*parts) -> int:
    """
    A 63-bit seed from ``parts`` (integers or strings), the same in every process:
    BLAKE2b of their comma-joined text. Different parts give unrelated seeds.
    """
    payload = ",".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


def next_shared_count(key: Hashable) -> int:
    """
    How many times this was called with ``key`` before (0, 1, 2, ...). Code that every
    rank runs equally often (e.g. once per collective) gets the same numbers on every rank
    without communicating; the counts are part of :class:`RNGState`.
    """
    count = _SHARED_COUNTS.get(key, 0)
    _SHARED_COUNTS[key] = count + 1
    return count


class RNGState(NamedTuple):
    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: Optional[list]  # None while CUDA is not initialized
    shared_counts: Dict[Hashable, int]


def get_rng_state() -> RNGState:
    """The process's random state now (copies)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return RNGState(
        random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda,
        dict(_SHARED_COUNTS),
    )


def set_rng_state(state: RNGState) -> None:
    """Puts back a state from :func:`get_rng_state`."""
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda is not None:
        torch.cuda.set_rng_state_all(state.torch_cuda)
    _SHARED_COUNTS.clear()
    _SHARED_COUNTS.update(state.shared_counts)


@contextmanager
def preserved_rng_state():
    """Randomness drawn inside the block is invisible outside: the state is put back at exit."""
    saved = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


class RandomStream:
    """
    A private stream of randomness: within ``with stream:`` every source of
    :class:`RNGState` continues this stream — started the first time from ``seed`` (Python,
    NumPy and torch seeded with it, shared counts from 0) — and at exit the state from
    before the block is put back, so the surrounding code sees no draw. Processes that use
    streams with equal seeds the same way draw the same numbers.
    """

    def __init__(self, seed: int):
        self._seed = int(seed)
        self._state: Optional[RNGState] = None
        self._outer: Optional[RNGState] = None

    def __enter__(self) -> "RandomStream":
        if self._outer is not None:
            raise RuntimeError("a RandomStream cannot be entered again before it is left")
        self._outer = get_rng_state()
        if self._state is None:
            random.seed(self._seed)
            np.random.seed(self._seed % 2**32)
            torch.manual_seed(self._seed)  # also every CUDA device
            _SHARED_COUNTS.clear()
        else:
            set_rng_state(self._state)
        return self

    def __exit__(self, *exc) -> None:
        self._state = get_rng_state()
        set_rng_state(self._outer)
        self._outer = None
