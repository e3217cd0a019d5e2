#!/usr/bin/env python
"""
Benchmarks d2_batchnorm's norms, side by side in one run, and prints Markdown tables of
ratios and the machine they ran on (docs/benchmarks.md quotes the latest output):

1. time of one training iteration (forward + backward) of ``SyncBatchNorm`` versus plain
   ``nn.BatchNorm2d`` (no communication) and detectron2's ``NaiveSyncBatchNorm`` (both
   stats modes), in 2 CPU processes over gloo, each pinned to its own core when there are
   enough (unpinned, scheduler migrations add latency to every variant and noise between
   runs); the variants are timed round-robin, and the median over repetitions is reported
   (rank 0; ranks are barrier-aligned), over --rounds fresh pairs of processes (the median
   of the rounds, and each round's SyncBN / naiveSyncBN to show the spread);
2. peak memory of a forward + backward of ``LevelBatchNorm(stats="shared")`` (per-level
   power sums, no concatenation) versus a concatenate-then-split implementation (all
   levels flattened and concatenated, one BatchNorm1d, split back), for RetinaNet-like
   FPN levels P3-P7: bytes autograd saves for backward besides the inputs (exact, from
   saved-tensor hooks) and, in a fresh process, the peak resident size during forward +
   backward above the resident size before it (inputs and upstream gradients allocated).

    python tools/bench_norms.py [--reps 300] [--rounds 3] [--no-pin] [--quick]
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from bench_report import machine_description, write_section  # tools/bench_report.py


TIME_SHAPES = [(8, 64, 64, 64), (2, 256, 32, 32), (2, 256, 8, 8)]
LEVEL_SIZES = [128, 64, 32, 16, 8]  # P3-P7 of a 1024x1024 image
LEVEL_BATCH, LEVEL_CHANNELS = 2, 256


def _time_worker(reps, shapes, pin=True):
    """Runs in each of 2 gloo processes; returns {shape: {variant: median seconds}}."""
    import torch.distributed as dist
    from detectron2.layers import NaiveSyncBatchNorm

    from d2_batchnorm.layers import SyncBatchNorm

    torch.set_num_threads(1)
    cores = sorted(os.sched_getaffinity(0))
    if pin and len(cores) >= dist.get_world_size():  # one core per rank, as a launcher pins GPUs
        os.sched_setaffinity(0, {cores[dist.get_rank()]})
    results = {}
    for shape in shapes:
        c = shape[1]
        variants = {
            "BN": nn.BatchNorm2d(c),
            "SyncBN": SyncBatchNorm(c),
            "naiveSyncBN": NaiveSyncBatchNorm(c),
            "naiveSyncBN_N": NaiveSyncBatchNorm(c, stats_mode="N"),
        }
        x = torch.randn(shape).requires_grad_()
        dy = torch.randn(shape)
        times = {k: [] for k in variants}
        for rep in range(reps + 3):
            for name, module in variants.items():
                dist.barrier()
                start = time.perf_counter()
                (module(x) * dy).sum().backward()
                elapsed = time.perf_counter() - start
                if rep >= 3:  # warm-up
                    times[name].append(elapsed)
                x.grad = None
        results[str(shape)] = {k: statistics.median(v) for k, v in times.items()}
    return results


def _levels(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(LEVEL_BATCH, LEVEL_CHANNELS, s, s, generator=g).requires_grad_(requires_grad)
        for s in LEVEL_SIZES
    ]


class ConcatSplitBatchNorm(nn.Module):
    """The reference: flatten and concatenate all levels, one BN, split and reshape back."""

    def __init__(self, channels):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, features):
        flat = torch.cat([x.flatten(2) for x in features], dim=2)  # (N, C, sum H_i W_i)
        out = self.bn(flat).split([x[0, 0].numel() for x in features], dim=2)
        return [o.reshape(x.shape) for o, x in zip(out, features)]


def _build(variant):
    from d2_batchnorm.layers import LevelBatchNorm

    if variant == "shared":
        return LevelBatchNorm(LEVEL_CHANNELS, len(LEVEL_SIZES), "shared")
    if variant == "per_level":
        return LevelBatchNorm(LEVEL_CHANNELS, len(LEVEL_SIZES), "per_level")
    return ConcatSplitBatchNorm(LEVEL_CHANNELS)


def _saved_bytes(variant):
    """Bytes of the distinct storages autograd saves for backward (inputs excluded)."""
    module, feats = _build(variant), _levels()
    inputs = {x.untyped_storage().data_ptr() for x in feats}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in inputs:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(feats)
    sum((o * o).sum() for o in out).backward()
    return sum(storages.values())


def _peak_rss_worker(variant):
    """In a fresh process: growth of peak RSS (bytes) during one forward + backward."""
    torch.set_num_threads(1)
    module, feats = _build(variant), _levels()
    grads = [torch.randn_like(x) for x in feats]
    before = _rss()
    out = module(feats)
    held = _rss() - before  # what a network keeps per layer until its backward pass
    sum((o * g).sum() for o, g in zip(out, grads)).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(held, peak - before)


def _rss():
    with open("/proc/self/statm") as f:  # resident size now, in pages
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss(variant):
    # A fixed mmap threshold makes glibc map every large block and unmap it when freed, so
    # the peak resident size tracks the peak of live tensors (no heap reuse effects).
    env = dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--rss-worker", variant],
        capture_output=True, text=True, env=env, check=True,
    ).stdout
    held, peak = out.strip().splitlines()[-1].split()
    return int(held), int(peak)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=300, help="timed repetitions per variant")
    parser.add_argument("--rounds", type=int, default=3,
                        help="independent pairs of processes the timing is repeated in (their spread is printed)")
    parser.add_argument("--no-pin", action="store_true", help="let the scheduler place the 2 processes")
    parser.add_argument("--quick", action="store_true", help="2 shapes, 5 repetitions, 1 round")
    parser.add_argument("--no-readme", action="store_true", help="do not write the output into docs/benchmarks.md")
    parser.add_argument("--rss-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_worker:
        return _peak_rss_worker(args.rss_worker)

    from d2_batchnorm.engine import run_on_local_workers

    for name in ("reps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} = {getattr(args, name)} is not allowed; it must be >= 1")
    shapes = TIME_SHAPES[1:] if args.quick else TIME_SHAPES
    reps = 5 if args.quick else args.reps
    num_rounds = 1 if args.quick else args.rounds
    lines = []

    def emit(text=""):
        print(text)
        lines.append(text)

    placement = "pinned, one core each" if not args.no_pin else "not pinned"
    emit(f"Machine: {machine_description(f'gloo, 1 thread per process, {placement}')}\n")
    rounds = [run_on_local_workers(_time_worker, 2, (reps, shapes, not args.no_pin))[0] for _ in range(num_rounds)]
    timing = {
        shape: {k: statistics.median(r[shape][k] for r in rounds) for k in rounds[0][shape]}
        for shape in rounds[0]
    }
    emit(f"#### Time per iteration (forward + backward), 2 CPU processes over gloo ({placement}), "
         f"1 thread each, median over {num_rounds} rounds of the median of {reps}\n")
    emit("| input (N, C, H, W) per worker | BN (no sync) | naiveSyncBN | naiveSyncBN_N | SyncBN "
          "| SyncBN / BN | SyncBN / naiveSyncBN | SyncBN / naiveSyncBN_N | SyncBN / naiveSyncBN per round |")
    emit("|---|---|---|---|---|---|---|---|---|")
    for shape, t in timing.items():
        ms = {k: f"{v * 1e3:.2f} ms" for k, v in t.items()}
        per_round = " ".join(f"{r[shape]['SyncBN'] / r[shape]['naiveSyncBN']:.2f}" for r in rounds)
        emit(f"| {shape} | {ms['BN']} | {ms['naiveSyncBN']} | {ms['naiveSyncBN_N']} | {ms['SyncBN']} "
              f"| {t['SyncBN'] / t['BN']:.2f} | {t['SyncBN'] / t['naiveSyncBN']:.2f} "
              f"| {t['SyncBN'] / t['naiveSyncBN_N']:.2f} | {per_round} |")

    sizes = ", ".join(f"{s}x{s}" for s in LEVEL_SIZES)
    emit(f"\n#### Memory of level statistics, 5 levels ({sizes}), N={LEVEL_BATCH}, C={LEVEL_CHANNELS}\n")
    emit("| implementation | saved for backward | RSS held after forward | peak RSS growth (fwd + bwd) |")
    emit("|---|---|---|---|")
    mem = {}
    for variant, label in (
        ("concat", "concatenate-then-split, one BatchNorm1d"),
        ("shared", "LevelBatchNorm stats=shared (power sums)"),
        ("per_level", "LevelBatchNorm stats=per_level"),
    ):
        mem[variant] = (_saved_bytes(variant), *_peak_rss(variant))
        emit(f"| {label} | " + " | ".join(f"{b / 2**20:.1f} MiB" for b in mem[variant]) + " |")
    ratios = [mem["shared"][i] / max(mem["concat"][i], 1) for i in range(3)]
    emit(f"\nshared / concatenate-then-split: saved for backward {ratios[0]:.2f}x, held after "
          f"forward {ratios[1]:.2f}x, peak {ratios[2]:.2f}x")

    if not args.no_readme:
        write_section("bench_norms", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
