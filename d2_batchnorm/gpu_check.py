"""
A self-check of d2_batchnorm on one CUDA device, in one process: what ``tools/check_gpu.py``
runs and the ``cuda`` tests assert.

Every check compares our code with torch's (or fvcore's) own on the same inputs:

* the norms, in float32 and in float16/bfloat16 (inputs in that dtype, as a conv under
  autocast hands them over, float32 parameters, inside ``torch.autocast``), contiguous and
  channels_last, one training step (output, input/weight/bias gradients, running
  statistics) and one eval step:

  - ``SyncBatchNorm`` on one GPU against ``nn.BatchNorm2d``;
  - the synchronized path of ``SyncBatchNorm`` (:meth:`.layers.SyncBatchNorm.normalize_over`)
    through a 1-process NCCL group against the function ``nn.SyncBatchNorm`` runs
    (``torch.nn.modules._functions.SyncBatchNorm``, torch's fused CUDA kernels) through
    the same group, with both step times;
  - ``LevelBatchNorm`` with per-level and shared statistics on three levels, the last
    1x1, against ``F.batch_norm`` per level / over the concatenated levels;
  - ``GhostBatchNorm`` against ``F.batch_norm`` per ghost batch;

* PreciseBN (:func:`.precise_bn.update_bn_stats`) against fvcore's ``update_bn_stats``
  on a small convnet, with both times;
* the RoI shuffle round trip (on one GPU the identity, values and gradients);
* a few training iterations of ``d2bn train --num-gpus 1`` (``tools/train_net.py``) with
  ``SOLVER.AMP.ENABLED True`` (:func:`training_checks`).

The error of a check is ``max |ours - reference| / max(1, max |reference|)`` over every
tensor it compares; it passes when that is at most the tolerance of its precision (:data:`TOLERANCES`).
The norm, PreciseBN and shuffle checks also run on CPU (``device="cpu"``: a gloo group,
bfloat16 autocast, and ``nn.BatchNorm2d`` as the reference of the synchronized path, as
torch's kernels exist only for CUDA), which is how the tests keep this module working on
machines without a GPU.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layers import GhostBatchNorm, LevelBatchNorm, SyncBatchNorm
from .layers.roi_shuffle import shuffle_rois, unshuffle_rois
from .model_zoo import get_config_file
from .precise_bn import update_bn_stats
from .tables import markdown_table

__all__ = ["CheckResult", "randomize_affine_", "TOLERANCES", "PRECISIONS", "LAYOUTS", "norm_checks", "precise_bn_checks",
           "shuffle_checks", "training_checks", "run_all", "format_table", "single_process_group"]

#: input dtype of each precision checked (None: float32 without autocast)
PRECISIONS: Dict[str, Optional[torch.dtype]] = {
    "float32": None, "float16 autocast": torch.float16, "bfloat16 autocast": torch.bfloat16,
}
#: relative tolerance per input dtype: a few units in the last place of values of order 1
TOLERANCES = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
C = 16


@dataclass
class CheckResult:
    """One row of the table: a check, its error against its reference and its tolerance."""

    name: str
    max_error: float
    tolerance: float
    reference: str = ""
    ms: Optional[float] = None  # our time per step, where timed
    reference_ms: Optional[float] = None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance  # False for NaN

    def as_dict(self) -> dict:
        return dict(asdict(self), passed=self.passed)


def _error(ours: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """
    max |a - b| / max(1, max |b|) over pairs of tensors (NaN if a shape is off, inf if a
    value is not finite): relative for tensors of order >= 1, absolute for small ones such
    as the input gradient of a 1x1 level of two samples, which is near 0 by construction.
    """
    worst = 0.0
    for a, b in zip(ours, refs):
        if a.shape != b.shape:
            return float("nan")
        a, b = a.detach().double(), b.detach().double()
        scale = b.abs().max().clamp(min=1.0)
        worst = max(worst, float(((a - b).abs().max() / scale).nan_to_num(float("inf"))))
    return worst


def single_process_group(device: torch.device):
    """
    Initializes a 1-process torch.distributed group (NCCL on CUDA, gloo on CPU) unless one
    exists; returns a function that destroys it again (a no-op when it existed).
    """
    if dist.is_initialized():
        return lambda: None
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.NamedTemporaryFile(prefix="d2bn-check-") as f:
        dist.init_process_group(backend, init_method=f"file://{f.name}", rank=0, world_size=1,
                                timeout=timedelta(minutes=2))
    return dist.destroy_process_group


def _inputs(shapes, dtype, layout, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(s, generator=g) * 2 + 1).to(device, dtype or torch.float32) for s in shapes]
    xs = [x.contiguous(memory_format=layout).requires_grad_() for x in xs]
    dys = [torch.randn(s, generator=g).to(device) for s in shapes]
    return xs, dys


def randomize_affine_(module: nn.Module, seed: int = 1) -> nn.Module:
    """Gives a norm's weight values in [0.5, 1.5) and its bias normal values, in place (checks, tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
        module.bias.copy_(torch.randn(module.bias.shape, generator=g))
    return module


def _affine(module: nn.Module, device) -> nn.Module:
    return randomize_affine_(module).to(device)


def _train_step(fn: Callable, params: Sequence[torch.Tensor], shapes, dtype, layout, device):
    """
    One training step of ``fn`` (a list of inputs -> a list of outputs) under autocast when
    ``dtype`` is half: returns outputs, input gradients and the gradients of ``params``.
    """
    xs, dys = _inputs(shapes, dtype, layout, device)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        ys = fn(xs)
    sum((y.float() * dy).sum() for y, dy in zip(ys, dys)).backward()
    kept = all(y.dtype == x.dtype and y.is_contiguous(memory_format=layout) for x, y in zip(xs, ys))
    return [y.detach() for y in ys] + [x.grad for x in xs] + [p.grad for p in params], kept


def _eval_step(fn: Callable, shapes, dtype, layout, device):
    xs, _ = _inputs(shapes, dtype, layout, device, seed=2)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return [y.float() for y in fn(xs)]


def _timed(step: Callable[[], None], device, reps: int = 20) -> float:
    """Milliseconds per call of ``step`` (after 3 warm-up calls), synchronizing the device."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    return (time.perf_counter() - start) * 1e3 / reps


def _compare(name, reference, make_ours, make_ref, call_ours, call_ref, shapes, dtype, layout, device):
    """A training and an eval step of our module and the reference module, compared."""
    ours, ref = make_ours(), make_ref()
    out_ours, kept = _train_step(lambda xs: call_ours(ours, xs), [ours.weight, ours.bias], shapes, dtype, layout, device)
    out_ref, _ = _train_step(lambda xs: call_ref(ref, xs), [ref.weight, ref.bias], shapes, dtype, layout, device)
    out_ours += [ours.running_mean, ours.running_var]
    out_ref += [ref.running_mean, ref.running_var]
    ours.eval(), ref.eval()
    out_ours += _eval_step(lambda xs: call_ours(ours, xs), shapes, dtype, layout, device)
    out_ref += _eval_step(lambda xs: call_ref(ref, xs), shapes, dtype, layout, device)
    error = _error(out_ours, out_ref) if kept else float("nan")
    return CheckResult(name, error, TOLERANCES[dtype or torch.float32], reference,
                       detail="" if kept else "output dtype or memory format not kept")


class _LevelReference(nn.BatchNorm2d):
    """
    ``LevelBatchNorm``'s meaning written with ``F.batch_norm``: per-level statistics with one
    row of (L, C) running buffers per level, or shared ones over the levels' values together.
    """

    def __init__(self, channels: int, num_levels: int, stats: str):
        super().__init__(channels)
        self.stats = stats
        if stats == "per_level":
            self.running_mean = torch.zeros(num_levels, channels)
            self.running_var = torch.ones(num_levels, channels)

    def forward(self, xs):
        if self.stats == "per_level":
            return [F.batch_norm(x, self.running_mean[i], self.running_var[i], self.weight, self.bias,
                                 self.training, self.momentum, self.eps) for i, x in enumerate(xs)]
        flat = torch.cat([x.flatten(2) for x in xs], 2).unsqueeze(-1)  # (N, C, sum HW, 1)
        y = super().forward(flat).squeeze(-1)
        return [part.reshape(x.shape) for part, x in zip(y.split([x[0, 0].numel() for x in xs], 2), xs)]


def _ghost_reference(ref: nn.BatchNorm2d, xs, ghost_batch_size: int = 2):
    """F.batch_norm per ghost batch; the running statistics track the whole batch."""
    x = xs[0]
    if not ref.training:
        return [ref(x)]
    with torch.no_grad():
        F.batch_norm(x, ref.running_mean, ref.running_var, None, None, True, ref.momentum, ref.eps)
    return [torch.cat([F.batch_norm(p, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
                       for p in x.split(ghost_batch_size)])]


def _sync_over_group(module: SyncBatchNorm, xs):
    """SyncBatchNorm's synchronized path, through the world group even when it has 1 process."""
    return [module.normalize_over(xs[0], None) if module.training else module(xs[0])]


def _torch_sync_function(module: nn.BatchNorm2d, xs):
    """What nn.SyncBatchNorm runs when synchronizing: torch's fused CUDA kernels."""
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncFunction

    if not module.training:
        return [module(xs[0])]
    return [TorchSyncFunction.apply(xs[0], module.weight, module.bias, module.running_mean, module.running_var,
                                    module.eps, module.momentum, dist.group.WORLD, dist.get_world_size())]


def norm_checks(device: torch.device, timing_shape=(8, 256, 32, 32)) -> List[CheckResult]:
    """Every norm, precision and layout (module docstring); needs a process group."""
    results = []
    single = [(4, C, 6, 6)]
    levels = [(2, C, 8, 8), (2, C, 4, 4), (2, C, 1, 1)]
    bn = lambda: _affine(nn.BatchNorm2d(C), device)  # noqa: E731
    for precision, dtype in PRECISIONS.items():
        if device.type == "cpu" and dtype == torch.float16:
            continue  # CPU autocast is bfloat16
        for layout_name, layout in LAYOUTS.items():
            tag = f"[{precision}, {layout_name}]"
            plain = lambda m, xs: [m(xs[0])]  # noqa: E731
            results.append(_compare(f"SyncBatchNorm, 1 GPU {tag}", "nn.BatchNorm2d",
                                    lambda: _affine(SyncBatchNorm(C), device), bn, plain, plain,
                                    single, dtype, layout, device))
            cuda = device.type == "cuda"
            result = _compare(
                f"SyncBatchNorm over a 1-process {'NCCL' if cuda else 'gloo'} group {tag}",
                "nn.SyncBatchNorm kernels" if cuda else "nn.BatchNorm2d",  # torch's kernels: CUDA only
                lambda: _affine(SyncBatchNorm(C), device), bn, _sync_over_group,
                _torch_sync_function if cuda else plain, single, dtype, layout, device,
            )
            if cuda:
                result.ms, result.reference_ms = _sync_times(device, timing_shape, dtype, layout)
            results.append(result)
            for stats in ("per_level", "shared"):
                results.append(_compare(
                    f"LevelBatchNorm {stats}, 1x1 level {tag}", "F.batch_norm",
                    lambda s=stats: _affine(LevelBatchNorm(C, len(levels), s), device),
                    lambda s=stats: _affine(_LevelReference(C, len(levels), s), device),
                    lambda m, xs: m(xs), lambda m, xs: m(xs), levels, dtype, layout, device,
                ))
            results.append(_compare(
                f"GhostBatchNorm {tag}", "F.batch_norm per ghost batch",
                lambda: _affine(GhostBatchNorm(C, 2), device), bn, plain, _ghost_reference,
                single, dtype, layout, device,
            ))
    return results


def _sync_times(device, shape, dtype, layout):
    """ms per training step (forward + backward) of the synchronized path: ours, torch's."""
    times = []
    for call in (_sync_over_group, _torch_sync_function):
        module = _affine(SyncBatchNorm(shape[1]), device)
        xs, dys = _inputs([shape], dtype, layout, device)

        def step():
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                (y,) = call(module, xs)
            y.backward(dys[0].to(y.dtype))

        times.append(_timed(step, device))
    return times


def _convnet(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(),
        nn.Conv2d(C, C, 3, padding=1), SyncBatchNorm(C), nn.ReLU(),
        nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C),
    ).to(device)


def precise_bn_checks(device: torch.device, num_batches: int = 20) -> List[CheckResult]:
    """Our PreciseBN against fvcore's on the same convnet and batches, contiguous and channels_last."""
    from fvcore.nn.precise_bn import update_bn_stats as fvcore_update_bn_stats

    g = torch.Generator().manual_seed(3)
    results = []
    for layout_name, layout in LAYOUTS.items():
        batches = [(torch.randn(8, 3, 32, 32, generator=g) * 3 + 1).to(device).contiguous(memory_format=layout)
                   for _ in range(num_batches)]
        ours, ref = _convnet(device), _convnet(device)
        ms = _timed(lambda: update_bn_stats(ours, batches, num_iters=num_batches), device, reps=2)
        ref_ms = _timed(lambda: fvcore_update_bn_stats(ref, batches, num_iters=num_batches), device, reps=2)
        buffers = lambda net: [t for m in net if isinstance(m, nn.BatchNorm2d)  # noqa: E731
                               for t in (m.running_mean, m.running_var)]
        results.append(CheckResult(f"PreciseBN, {num_batches} batches [float32, {layout_name}]",
                                   _error(buffers(ours), buffers(ref)), 1e-4, "fvcore update_bn_stats",
                                   ms, ref_ms))
    return results


def shuffle_checks(device: torch.device) -> List[CheckResult]:
    """The RoI shuffle round trip on ``device``: rows and their gradients come back as they were."""
    x = torch.randn(7, C, 2, 2, device=device, requires_grad=True)
    y, state = shuffle_rois(x, seed=5)
    out = unshuffle_rois(y * 2.0, state)
    out.backward(torch.ones_like(out))
    error = _error([out, x.grad], [x.detach() * 2.0, torch.full_like(x, 2.0)])
    return [CheckResult("RoI shuffle round trip (1 worker) [float32]", error, 0.0, "identity")]


#: the training runs: (name, shipped config, extra options)
TRAININGS = [
    ("RetinaNet, shared level statistics, SyncBN head",
     "Toy/retinanet_R18_FPN_syncbn_head_train_shared_pop_shared.yaml", []),
    ("Mask R-CNN, SyncBN heads, PreciseBN",
     "Toy/mask_rcnn_R18_FPN_syncbn_head.yaml",
     ["TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.NUM_ITER", "2"]),
]


def training_checks(iterations: int = 3, timeout: float = 240.0) -> List[CheckResult]:
    """
    ``iterations`` iterations of ``d2bn train --num-gpus 1`` (tools/train_net.py) with AMP on each of
    :data:`TRAININGS` (toy data, evaluation skipped); passes when it exits 0 with finite
    losses in its metrics.json. The error column holds 0 (pass) or 1 (fail).
    """
    results = []
    for name, config, extra in TRAININGS:
        with tempfile.TemporaryDirectory(prefix="d2bn-check-train-") as out:
            cmd = [sys.executable, "-m", "d2_batchnorm.cli.train_net", "--num-gpus", "1",
                   "--config-file", get_config_file(config),
                   "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", str(iterations), "SOLVER.IMS_PER_BATCH", "4",
                   "MODEL.DEVICE", "cuda", "OUTPUT_DIR", out, "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
                   *extra]
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                ok, detail = proc.returncode == 0, (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            except subprocess.TimeoutExpired:
                ok, detail = False, [f"no result within {timeout:.0f} s"]
            losses = _losses(os.path.join(out, "metrics.json"))
            ok = ok and bool(losses) and all(map(math.isfinite, losses))
            seconds = time.perf_counter() - start
        results.append(CheckResult(f"train_net --num-gpus 1, AMP, {iterations} it: {name}", 0.0 if ok else 1.0, 0.0,
                                   "exit 0, finite losses", ms=seconds * 1e3,
                                   detail="" if ok else " ".join(detail)[:200]))
    return results


def _losses(path: str) -> List[float]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row["total_loss"] for row in rows if "total_loss" in row]


def run_all(device: torch.device, train: bool = False) -> List[CheckResult]:
    """Every check on ``device`` (the training runs with ``train``)."""
    destroy = single_process_group(device)
    try:
        results = norm_checks(device) + precise_bn_checks(device) + shuffle_checks(device)
    finally:
        destroy()
    if train:
        results += training_checks()
    return results


def format_table(results: Sequence[CheckResult]) -> str:
    """A Markdown table: check, max error, tolerance, PASS/FAIL, our time vs the reference's."""
    rows = []
    for r in results:
        timing = ""
        if r.ms is not None and r.reference_ms is not None:
            timing = f"{r.ms:.3f} / {r.reference_ms:.3f} ms = {r.ms / r.reference_ms:.2f}x"
        elif r.ms is not None:
            timing = f"{r.ms / 1e3:.1f} s"
        rows.append([r.name, f"{r.max_error:.2e}", f"{r.tolerance:.0e}", "PASS" if r.passed else "FAIL",
                     r.reference, timing, r.detail])
    return markdown_table(["check", "max error", "tolerance", "result", "reference", "ours / reference", "detail"], rows)
