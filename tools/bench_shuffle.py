#!/usr/bin/env python
"""
Benchmark of leakage mitigation in an R-CNN box head, per training iteration, in W local
CPU processes (gloo), all variants side by side in one run (interleaved iterations):

* ``bn``: per-worker BN head, no mitigation (no communication; the compute baseline);
* ``shuffle (ours)``: :func:`d2_batchnorm.layers.shuffle_rois` — one all-to-all to shuffle,
  one to unshuffle (and the same two in backward), a shared permutation without broadcast;
* ``shuffle (reference)``: a small reimplementation of detectron2's
  ``projects/Rethinking-BatchNorm`` shuffle from its description: all-gather the RoI
  counts (pickled objects), pad every worker's RoIs to the largest count and all-gather
  them (fvcore's ``differentiable_all_gather``; its backward all-reduces the gathered
  gradient), ``randperm`` broadcast from rank 0, each rank takes a ``ceil(N / W)`` slice;
  the unshuffle gathers the head outputs again the same way;
* ``syncbn``: the head's BN layers synchronized over all workers (d2_batchnorm's SyncBN).

For each: median time per iteration of the head's forward + backward (slowest rank), the
time of the shuffle / unshuffle communication alone (forward + backward, on the same
tensors, without the head's layers), and the bytes each worker hands to torch.distributed
for other workers. Bytes are counted at the torch.distributed call boundary, inside the
benchmark processes only, with the usual algorithms' per-worker traffic: all_to_all sends
its rows for other ranks; all_gather (ring) sends (W-1) x its input; all_reduce (ring)
sends 2 (W-1) / W x the tensor; broadcast: the root sends (W-1) x the tensor;
all_gather_object: (W-1) x the pickled object. Prints a Markdown table, the formulas for
W workers, and the machine it ran on; ``--out FILE`` also writes them.

    python tools/bench_shuffle.py [--workers 2] [--rois 256] [--channels 64] [--iters 20]
"""
import argparse
import math
import pickle
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Dict, List

import torch
from bench_report import machine_description, write_section  # tools/bench_report.py


METHODS = ("bn", "shuffle (ours)", "shuffle (reference)", "syncbn")


# --------------------------------------------------------------------------- byte counting
class _ByteCounter:
    """Counts bytes this process sends to other workers through torch.distributed."""

    def __init__(self):
        self.bytes = 0
        self._originals = {}

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    @contextmanager
    def counting(self):
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        originals = {name: getattr(dist, name) for name in (
            "all_to_all_single", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce",
            "broadcast", "all_gather_object",
        )}

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *a, **k):
            if input_split_sizes is None:
                sent = self._nbytes(input) * (world - 1) // world
            else:
                row = self._nbytes(input) // max(input.shape[0], 1)
                sent = row * sum(c for d, c in enumerate(input_split_sizes) if d != rank)
            self.bytes += sent
            return originals["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, *a, **k)

        def all_gather(tensor_list, tensor, *a, **k):
            self.bytes += self._nbytes(tensor) * (world - 1)
            return originals["all_gather"](tensor_list, tensor, *a, **k)

        def gather_into_one_tensor(name):  # all_gather_into_tensor and all_gather_single
            def gather(output, input, *a, **k):
                self.bytes += self._nbytes(input) * (world - 1)
                return originals[name](output, input, *a, **k)
            return gather

        def all_reduce(tensor, *a, **k):
            self.bytes += 2 * (world - 1) * self._nbytes(tensor) // world
            return originals["all_reduce"](tensor, *a, **k)

        def broadcast(tensor, src=0, *a, **k):
            if rank == src:
                self.bytes += self._nbytes(tensor) * (world - 1)
            return originals["broadcast"](tensor, src, *a, **k)

        def all_gather_object(object_list, obj, *a, **k):
            self.bytes += len(pickle.dumps(obj)) * (world - 1)
            return originals["all_gather_object"](object_list, obj, *a, **k)

        replacements = dict(
            all_to_all_single=all_to_all_single, all_gather=all_gather,
            all_gather_into_tensor=gather_into_one_tensor("all_gather_into_tensor"),
            all_gather_single=gather_into_one_tensor("all_gather_single"), all_reduce=all_reduce,
            broadcast=broadcast, all_gather_object=all_gather_object,
        )
        for name, fn in replacements.items():
            setattr(dist, name, fn)
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


# --------------------------------------------------------------- the reference algorithm
def _reference_gather(x: torch.Tensor):
    """Pads every worker's rows to the largest count and all-gathers them (with autograd)."""
    from detectron2.utils import comm
    from fvcore.nn.distributed import differentiable_all_gather

    counts = comm.all_gather(int(x.shape[0]))
    padded = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = differentiable_all_gather(padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), counts


def reference_shuffle(x: torch.Tensor):
    """detectron2's projects/Rethinking-BatchNorm shuffle, as described in the module docstring."""
    from d2_batchnorm import distributed as d2bn_dist

    rank, world = d2bn_dist.group_rank(), d2bn_dist.group_size()
    everything, counts = _reference_gather(x)
    total = everything.shape[0]
    permutation = torch.randperm(total)
    torch.distributed.broadcast(permutation, src=0)
    start = sum(counts[:rank])
    restore = torch.argsort(permutation)[start : start + x.shape[0]]
    chunk = math.ceil(total / world)
    mine = permutation[rank * chunk : (rank + 1) * chunk]
    return everything[mine], restore


def reference_unshuffle(y: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
    everything, _ = _reference_gather(y)
    return everything[restore]


# ------------------------------------------------------------------------- the benchmark
def _build_heads(channels: int, fc_dim: int, num_conv: int):
    from detectron2.layers import ShapeSpec

    from d2_batchnorm.modeling.roi_heads import BNConvFCHead

    heads = {}
    for method in METHODS:
        mitigation = {"bn": "none", "shuffle (ours)": "shuffle", "syncbn": "syncbn"}.get(method, "none")
        torch.manual_seed(0)
        heads[method] = BNConvFCHead(
            ShapeSpec(channels=channels, height=7, width=7),
            conv_dims=[channels] * num_conv, fc_dims=[fc_dim],
            conv_norm="BN", leakage_mitigation=mitigation,
        ).train()
    return heads


def _step(method: str, head, x: torch.Tensor) -> None:
    if method == "shuffle (reference)":
        shuffled, restore = reference_shuffle(x)
        out = reference_unshuffle(head(shuffled), restore)
    else:
        out = head(x)
    out.square().mean().backward()


def _comm_only(method: str, x: torch.Tensor, fc_dim: int) -> None:
    """Shuffle, a per-RoI slice to the head's output width, unshuffle; forward + backward."""
    from d2_batchnorm.layers import shuffle_rois, unshuffle_rois

    if method == "shuffle (ours)":
        y, state = shuffle_rois(x)
        out = unshuffle_rois(y.flatten(1)[:, :fc_dim], state)
    elif method == "shuffle (reference)":
        y, restore = reference_shuffle(x)
        out = reference_unshuffle(y.flatten(1)[:, :fc_dim], restore)
    else:
        return
    out.square().mean().backward()


def _worker(rois: List[int], channels: int, fc_dim: int, num_conv: int, iters: int, warmup: int):
    from detectron2.utils import comm

    torch.set_num_threads(1)
    rank = comm.get_rank()
    heads = _build_heads(channels, fc_dim, num_conv)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(rois[rank], channels, 7, 7, generator=g).requires_grad_(True)
    counter = _ByteCounter()
    times: Dict[str, List[float]] = {m: [] for m in METHODS}
    comm_times: Dict[str, List[float]] = {m: [] for m in METHODS}
    sent: Dict[str, int] = {}
    for it in range(warmup + iters):
        for method in METHODS:  # interleaved: every method sees the same machine load
            for fn, store in ((lambda: _step(method, heads[method], x), times),
                              (lambda: _comm_only(method, x, fc_dim), comm_times)):
                comm.synchronize()
                counter.bytes = 0
                start = time.perf_counter()
                with counter.counting():
                    fn()
                elapsed = time.perf_counter() - start
                if it >= warmup:
                    store[method].append(elapsed)
                if store is times:
                    sent[method] = counter.bytes
                x.grad = None
    return {"times": times, "comm_times": comm_times, "sent": sent}


def _median_of_slowest(per_rank: List[List[float]]) -> float:
    return statistics.median(max(vals) for vals in zip(*per_rank)) if per_rank[0] else 0.0


def formulas() -> str:
    return (
        "Bytes sent per worker and iteration (forward + backward), W workers, n RoIs per worker "
        "(m = the largest n), F / G bytes of head input / output per RoI, N = W n RoIs in all, "
        "L BN layers of C channels:\n\n"
        "* shuffle (ours): 2 (W-1)/W · n · (F + G) expected, + 8 (W-1) B of counts: two all-to-alls "
        "forward, two backward, each moving the (W-1)/W of the rows that change worker.\n"
        "* shuffle (reference): 3 (W-1) · m · (F + G) + 8 N (randperm broadcast, root) + 4 pickled "
        "count gathers: all-gather of padded rows forward ((W-1) m F and (W-1) m G) and an all-reduce "
        "of the W m rows of gathered gradient backward (2 (W-1) m F and 2 (W-1) m G).\n"
        "* syncbn: L · (W-1) · ((2C + 1) · 8 + 2C · 4) B: per BN layer one all-gather of "
        "float64 [n, sum, sum of squares] (2C + 1) forward and one of float32 [sum dy, "
        "sum dy (x - mean)] (2C) backward (an all-reduce instead once W copies exceed 64 KiB).\n\n"
        "Ratio ours / reference ≈ 2 / (3 W) for equal counts: 1/3 at W = 2, 1/12 at W = 8."
    )


def formula_bytes(method: str, world: int, rois: List[int], f_bytes: int, g_bytes: int,
                  channels: int, num_conv: int) -> float:
    """Bytes per worker and iteration of :func:`formulas` (mean over workers; reference
    without its pickled count gathers)."""
    n, m, w = statistics.mean(rois), max(rois), world
    if method == "shuffle (ours)":
        return 2 * (w - 1) / w * n * (f_bytes + g_bytes) + 8 * (w - 1)
    if method == "shuffle (reference)":
        return 3 * (w - 1) * m * (f_bytes + g_bytes) + 8 * sum(rois) / w  # the root's broadcast, averaged
    if method == "syncbn":
        return num_conv * (w - 1) * ((2 * channels + 1) * 8 + 2 * channels * 4)
    return 0.0


def bytes_table(worlds: List[int], args) -> List[str]:
    """Measured bytes per worker (one iteration) against the formulas, for each W."""
    from d2_batchnorm.engine import run_on_local_workers

    f_bytes, g_bytes = args.channels * 49 * 4, args.fc_dim * 4
    lines = [
        f"Bytes sent per worker and iteration at W workers ({args.rois[0]} RoIs each; one iteration; "
        "measured / formula below):",
        "",
        "| W | shuffle (ours) | formula | shuffle (reference) | formula (w/o pickles) | ours / reference "
        "| 2 / (3W) | syncbn | formula |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in worlds:
        rois = [args.rois[0]] * w
        # W processes on few cores: slow to start, so a generous timeout
        results = run_on_local_workers(
            _worker, w, (rois, args.channels, args.fc_dim, args.num_conv, 1, 0), timeout=1800.0
        )
        sent = {m: statistics.mean(r["sent"][m] for r in results) for m in METHODS}
        ref = {m: formula_bytes(m, w, rois, f_bytes, g_bytes, args.channels, args.num_conv) for m in METHODS}
        ours, theirs = sent["shuffle (ours)"], sent["shuffle (reference)"]
        lines.append(
            f"| {w} | {ours / 1e6:.3f} MB | {ref['shuffle (ours)'] / 1e6:.3f} MB | {theirs / 1e6:.3f} MB "
            f"| {ref['shuffle (reference)'] / 1e6:.3f} MB | 1/{theirs / max(ours, 1):.2f} | 1/{1.5 * w:.0f} "
            f"| {sent['syncbn'] / 1e3:.1f} kB | {ref['syncbn'] / 1e3:.1f} kB |"
        )
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="local CPU processes (W)")
    parser.add_argument("--rois", type=int, nargs="+", default=[256],
                        help="RoIs per worker (one value for all, or one per worker)")
    parser.add_argument("--channels", type=int, default=64, help="conv channels (C; the paper: 256)")
    parser.add_argument("--fc-dim", type=int, default=256, help="fc width (the paper: 1024)")
    parser.add_argument("--num-conv", type=int, default=4, help="conv layers (4conv1fc: 4)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bytes-workers", type=int, nargs="*", default=[2, 4, 8],
                        help="W values of the bytes-only table (one iteration each; RoIs: the first --rois)")
    parser.add_argument("--no-readme", action="store_true", help="do not write the output into docs/benchmarks.md")
    parser.add_argument("--out", default="", help="also write the table and formulas to this Markdown file")
    args = parser.parse_args(argv)
    if any(w < 2 for w in args.bytes_workers):
        parser.error(f"--bytes-workers = {args.bytes_workers} is not allowed; every W must be >= 2")
    if args.workers < 2:
        parser.error(f"--workers = {args.workers} is not allowed; a shuffle needs >= 2 workers")
    if len(args.rois) not in (1, args.workers) or min(args.rois) < 0:
        parser.error(f"--rois = {args.rois} is not allowed; give one count >= 0 or one per worker")
    for name in ("channels", "fc_dim", "num_conv", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} = {getattr(args, name)} is not allowed; it must be >= 1")
    rois = args.rois * args.workers if len(args.rois) == 1 else args.rois

    from d2_batchnorm.engine import run_on_local_workers

    machine = machine_description("gloo, 1 thread per process")
    results = run_on_local_workers(
        _worker, args.workers, (rois, args.channels, args.fc_dim, args.num_conv, args.iters, args.warmup)
    )
    f_bytes, g_bytes = args.channels * 49 * 4, args.fc_dim * 4
    base = _median_of_slowest([r["times"]["bn"] for r in results])
    ours_sent = statistics.mean(r["sent"]["shuffle (ours)"] for r in results)
    lines = [
        f"W = {args.workers} CPU processes, RoIs per worker {rois}, head {args.num_conv}conv1fc "
        f"(C = {args.channels}, fc {args.fc_dim}, 7x7 RoI features: F = {f_bytes} B, G = {g_bytes} B per RoI), "
        f"median of {args.iters} interleaved iterations (slowest rank).",
        "",
        "| method | head fwd+bwd (ms) | vs bn | communication alone (ms) | bytes sent per worker | vs ours |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        t = _median_of_slowest([r["times"][method] for r in results])
        c = _median_of_slowest([r["comm_times"][method] for r in results]) if "shuffle" in method else None
        sent = statistics.mean(r["sent"][method] for r in results)
        lines.append(
            f"| {method} | {t * 1e3:.1f} | {t / base:.2f}x | {'' if c is None else f'{c * 1e3:.1f}'} | "
            f"{sent / 1e6:.3f} MB | {'' if not ours_sent else f'{sent / ours_sent:.3g}x'} |"
        )
    if args.bytes_workers:
        lines += [""] + bytes_table(args.bytes_workers, args)
    text = "\n".join(lines) + "\n\n" + formulas() + f"\n\nMachine: {machine}.\n"
    print(text)
    if not args.no_readme:
        write_section("bench_shuffle", text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
