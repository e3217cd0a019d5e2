"""
``run_workers(fn, *args, world_size=2)``: ``fn(*args)`` in ``world_size`` real gloo
processes (:func:`d2_batchnorm.engine.run_on_local_workers`), ``[result of rank 0, ...]``.

The workers are forked from one forkserver per test session that imported torch, detectron2
and d2_batchnorm once: each call starts its processes in a fraction of a second instead of
the seconds a spawned interpreter spends importing them, and each worker is still a new
process (no state is carried from one call to the next).
"""
import functools
import multiprocessing

PRELOAD = ["torch", "torch.distributed", "detectron2.engine", "detectron2.modeling", "d2_batchnorm"]


@functools.lru_cache(maxsize=None)
def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_workers(fn, *args, world_size=2, timeout=600.0):
    """``fn`` must be a module-level function of a test module (it is pickled by name)."""
    from d2_batchnorm.engine import run_on_local_workers

    return run_on_local_workers(fn, world_size, args, timeout=timeout, context=_context())
