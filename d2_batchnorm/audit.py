"""
The BatchNorm audit of a config: where its BatchNorm will bite, before training.

:func:`audit_config` builds the model exactly as training would (on CPU, no weights) and
describes every group of normalization modules — backbone, FPN, RetinaNet head, box head,
mask head, each configured by one ``MODEL.<NODE>.NORM`` key — by what its training batch is
and how its population statistics are computed; then :data:`RULES` turn that into
findings, each with the paper's reason and the config line that fixes it.

What a group's **training batch** is: the images whose samples share one set of batch
statistics in a training step ("images per normalization"):

* per-worker norms (``BN``): the images of one worker, ``SOLVER.IMS_PER_BATCH / workers``;
* synchronized norms (``SyncBN``, ``naiveSyncBN``): × the workers of a sync group
  (``BN.SYNC_GROUP_SIZE``, 0 = all);
* ``GhostBN``: ``BN.GHOST_BATCH_SIZE`` images;
* an R-CNN head whose RoIs are shuffled across workers (``LEAKAGE_MITIGATION shuffle``):
  each worker normalizes a random sample of the RoIs of all images of all workers.

The values per channel in one batch are images × (spatial positions per image) for the
image-level groups, measured by one forward of the backbone (and dense head) on a dummy
image of the training size; for the R-CNN heads, images × RoIs per image × pooled positions,
read from the built ROI heads (``batch_size_per_image``, the poolers' output size; the mask
head sees only foreground RoIs: at most ``positive_fraction`` of them).

Everything about the model is read from the built modules, so yacs configs and LazyConfigs
are audited alike; what only a config says (the training settings, batch, input size, LR
steps) comes through :class:`ConfigKind`.

Population statistics: the EMA (momentum m: an average over roughly the last 1/m
iterations) or PreciseBN (``TEST.PRECISE_BN``); for a head shared across FPN levels,
per level or shared, which must match how training computed them.
"""
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers.batch_norm import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import NORM_KEYS
from .config_kinds import ConfigKind, adapt, config_kind
from .engine.lazy import build_any_model
from .engine.precise_bn_settings import PreciseBNSettings
from .layers import GhostBatchNorm, LevelBatchNorm
from .modeling import BNConvFCHead, BNMaskRCNNConvUpsampleHead, BNRetinaNetHead
from .modeling.build import modules_of_norm_key, norm_keys_of_modules
from .tables import markdown_table

__all__ = ["NormGroup", "Finding", "Audit", "RULES", "audit_config", "audit_model",
           "LEAK_MAX_IMAGES", "SMALL_BATCH_IMAGES", "EMA_STALE_WEIGHT", "PRECISE_MIN_SAMPLES"]

#: A per-worker BN head normalizing the RoIs of at most this many images leaks: the paper's
#: setting (Sec. 6, 2 images per GPU) and this project's study (1 image per worker).
LEAK_MAX_IMAGES = 2
#: Batch statistics over fewer images than this are noisy estimates of the population ones
#: (the paper, Sec. 5; Wu & He, "Group Normalization", 2018: BN's error rises steeply as
#: the per-GPU batch falls below 8 images, which is why detectron2 freezes or synchronizes
#: backbone BN when it trains with 2 images per GPU).
SMALL_BATCH_IMAGES = 8
#: With PreciseBN off, the final EMA may give at most this weight, (1 - m)^(iterations since),
#: to statistics from before the last learning-rate change (or to its initial buffers).
#: projects/PreciseBN (5 seeds): momentum 0.1, twenty iterations after the step (weight
#: 0.12), EMA statistics within 0.8 ± 1.2 AP of precise ones; momentum 0.01 (weight 0.82,
#: 0.45 on the initial buffers) 18 AP below them.
EMA_STALE_WEIGHT = 0.25
#: The paper (Sec. 3) finds 10^3 - 10^4 samples enough for precise statistics.
PRECISE_MIN_SAMPLES = 1000

NORM_TYPES = (_BatchNorm, FrozenBatchNorm2d, nn.GroupNorm, nn.LayerNorm, D2LayerNorm)
GROUP_NAMES = {
    "RESNETS": "backbone",
    "FPN": "FPN",
    "RETINANET": "RetinaNet head",
    "ROI_BOX_HEAD": "box head",
    "ROI_MASK_HEAD": "mask head",
}
ROI_HEAD_KEYS = ("ROI_BOX_HEAD", "ROI_MASK_HEAD")


@dataclass
class NormGroup:
    """The normalization modules configured by one ``MODEL.<key>.NORM``, described."""

    name: str  # e.g. "box head"
    key: str  # e.g. "ROI_BOX_HEAD"
    norm: str  # what configures its norms: "`MODEL.<key>.NORM` = 'BN'", or a LazyConfig path
    types: Dict[str, int]  # module class name -> count
    batch_statistics: int  # modules normalizing by batch statistics in training
    workers_per_normalization: int = 1
    images_per_normalization: float = 0.0  # images sharing one batch statistic in training
    values_per_channel: str = ""  # per batch statistic, e.g. "8 × 256 … 8 × 4"
    population: str = ""  # how population statistics are computed
    consistent: Optional[bool] = None  # population statistics computed like training ones
    inconsistency: str = ""
    momenta: List[float] = field(default_factory=list)
    modules: List[str] = field(default_factory=list, repr=False)  # module names


@dataclass
class Finding:
    """One problem: where (group), what and why (the paper's reason), and the fix."""

    code: str
    group: str
    message: str
    why: str
    fix: str


@dataclass
class Audit:
    config: str
    world_size: int
    images_per_worker: int
    input_size: Tuple[int, int]
    groups: List[NormGroup]
    findings: List[Finding]
    measured: Dict[str, Dict] = field(default_factory=dict)  # group -> distances, "AP" -> ...

    def to_json(self) -> Dict:
        out = asdict(self)
        for g in out["groups"]:
            g.pop("modules")
        return out

    def to_markdown(self) -> str:
        h, w = self.input_size
        lines = [
            f"# BatchNorm audit of `{self.config}`",
            "",
            f"{self.world_size} worker(s), {self.images_per_worker} image(s) per worker; spatial "
            f"sizes from one {h}×{w} training image.",
            "",
        ]
        rows = []
        for g in self.groups:
            types = ", ".join(f"{n} {t}" for t, n in sorted(g.types.items())) or "none"
            batch = ("— (no batch statistics)" if not g.batch_statistics else
                     f"{_num(g.images_per_normalization)} ({g.workers_per_normalization} worker(s))")
            consistent = "—" if g.consistent is None else ("yes" if g.consistent else f"**no**: {g.inconsistency}")
            rows.append([g.name, g.norm, types, batch, g.values_per_channel or "—", g.population or "—", consistent])
        lines.append(markdown_table(["group", "norm", "modules", "training batch: images per normalization",
                                     "values per channel per batch", "population statistics",
                                     "computed like training"], rows))
        lines += [f"## Findings ({len(self.findings)})", ""]
        if not self.findings:
            lines.append("None: every BatchNorm's batch and population statistics look consistent.")
        for f in self.findings:
            lines += [f"- **{f.code}** ({f.group}): {f.message}", f"  - why: {f.why}", f"  - fix: `{f.fix}`"]
        if self.measured:
            lines += ["", "## Measured on the checkpoint", ""]
            for name, values in self.measured.items():
                lines.append(f"- {name}: " + ", ".join(f"{k} {_num(v)}" for k, v in values.items()))
        return "\n".join(lines) + "\n"


def _num(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if not x.is_integer() else str(int(x))
    return str(x)


# ------------------------------------------------------------------------------ groups

def _workers(m: nn.Module, world_size: int) -> int:
    """Workers whose samples one batch statistic of ``m`` pools in training."""
    if getattr(m, "sync_stats", False):  # d2_batchnorm's SyncBatchNorm / synchronized LevelBatchNorm
        group = getattr(m, "sync_group_size", None)  # 0: all workers
        return group if group and world_size % group == 0 else world_size
    if isinstance(m, (NaiveSyncBatchNorm, nn.SyncBatchNorm)):
        return world_size
    return 1


def _trace_calls(model: nn.Module, names: Sequence[str], input_size: Tuple[int, int]) -> Dict[str, List[int]]:
    """
    ``{module name: [spatial positions per image of each call]}`` over one eval-mode forward
    of the backbone (and of a dense head, ``model.head``) on a zero image of
    ``input_size`` (H, W), padded to the backbone's size divisibility. A module taking a
    list (one tensor per level) counts each tensor.
    """
    calls: Dict[str, List[int]] = {n: [] for n in names}
    handles = []
    for name, m in model.named_modules():
        if name in calls:
            def record(module, args, name=name):
                xs = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
                calls[name].extend(int(x[0, 0].numel()) for x in xs if x.dim() >= 2 and x.shape[0] > 0)
            handles.append(m.register_forward_pre_hook(record))
    mode = model.training
    try:
        model.eval()
        backbone = model.backbone
        div = max(getattr(backbone, "size_divisibility", 0) or 1, 1)
        h, w = (math.ceil(s / div) * div for s in input_size)
        device = next(model.parameters()).device
        with torch.no_grad():
            features = backbone(torch.zeros(1, 3, h, w, device=device))
            head, in_features = getattr(model, "head", None), getattr(model, "head_in_features", None)
            if head is not None and in_features:
                head([features[f] for f in in_features])
    finally:
        model.train(mode)
        for handle in handles:
            handle.remove()
    return calls


def _roi_values(model: nn.Module, key: str) -> Tuple[str, int]:
    """(how many RoIs per image a head's norms see in training, pooled positions: the pooler's (H, W))."""
    heads = model.roi_heads
    if key == "ROI_BOX_HEAD":
        return f"{heads.batch_size_per_image} RoIs", math.prod(heads.box_pooler.output_size)
    fg = int(heads.batch_size_per_image * heads.positive_fraction)
    return f"≤ {fg} foreground RoIs", math.prod(heads.mask_pooler.output_size)


def collect_groups(view: ConfigKind, model: nn.Module) -> List[NormGroup]:
    """The :class:`NormGroup` of every ``MODEL.<key>.NORM`` that configures modules of ``model``."""
    owner = norm_keys_of_modules(model)
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES) and id(m) in owner]
    owned = {key: [(n, m) for n, m in norms if owner[id(m)] == key] for key in NORM_KEYS}
    owned = {key: found for key, found in owned.items() if found}
    calls = _trace_calls(model, [n for found in owned.values() for n, _ in found], view.input_size())
    groups = []
    for key, found in owned.items():
        # normalizing by batch statistics in training (FrozenBN, GN and LN do not)
        stat_modules = [(n, m) for n, m in found if isinstance(m, _BatchNorm) and m.training]
        name = "FCOS head" if key == "RETINANET" and "FCOS" in type(model).__name__ else GROUP_NAMES[key]
        group = NormGroup(
            name=name, key=key, norm=view.describe_norm(key),
            types=dict(Counter(type(m).__name__ for _, m in found)),
            batch_statistics=len(stat_modules), modules=[n for n, _ in found],
        )
        if stat_modules:
            _describe_batch(group, view, model, stat_modules, calls)
            _describe_population(group, view, stat_modules, calls)
        groups.append(group)
    return groups


def _head_module(model: nn.Module, key: str) -> Optional[nn.Module]:
    roots = modules_of_norm_key(model, key)
    return roots[0] if roots else None


def _describe_batch(group, view: ConfigKind, model, stat_modules, calls) -> None:
    per_worker = view.images_per_worker()
    workers = max(_workers(m, view.world_size) for _, m in stat_modules)
    images = float(per_worker * workers)
    ghost = [m.ghost_batch_size for _, m in stat_modules if isinstance(m, GhostBatchNorm) and m.ghost_batch_size]
    if ghost:
        images = float(min(ghost))
    if group.key in ROI_HEAD_KEYS:
        mitigation = getattr(_head_module(model, group.key), "leakage_mitigation", "none")
        if mitigation == "shuffle" and workers == 1:  # RoIs of all images of all workers, randomly mixed
            workers, images = view.world_size, float(per_worker * view.world_size)
        rois, positions = _roi_values(model, group.key)
        group.values_per_channel = f"{_num(images)} images × {rois} × {positions} positions"
    else:
        sizes = sorted({s for n, _ in stat_modules for s in calls.get(n, [])}, reverse=True)
        if sizes:
            span = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]} … {sizes[-1]}"
            group.values_per_channel = f"{_num(images)} images × {span} positions"
    group.workers_per_normalization, group.images_per_normalization = workers, images


def _describe_population(group, view: ConfigKind, stat_modules, calls) -> None:
    group.momenta = sorted({float(m.momentum) for _, m in stat_modules if m.momentum is not None})
    precise = PreciseBNSettings.from_config(view.cfg, view.world_size)
    if precise.enabled:
        every = f"every {precise.period} iterations and " if precise.period else ""
        group.population = f"PreciseBN: {precise.images} images, {every}after the last iteration"
    else:
        group.population = ", ".join(f"EMA, momentum {m:g} (≈ the last {1 / m:.0f} iterations)" for m in group.momenta)
    problems = []
    for name, m in stat_modules:
        if isinstance(m, LevelBatchNorm):
            if m.population_stats != m.stats:
                problems.append(f"{m.stats} in training, {m.population_stats} population statistics")
        elif len(calls.get(name, [])) > 1:  # one module, one EMA, called once per level
            problems.append(f"batch statistics per call ({len(calls[name])} per forward), one EMA over all")
    levels = [m for _, m in stat_modules if isinstance(m, LevelBatchNorm)]
    if levels:
        group.population += f"; {levels[0].population_stats} over {levels[0].num_levels} levels"
    group.consistent = not problems
    group.inconsistency = "; ".join(sorted(set(problems)))


# ------------------------------------------------------------------------------- rules

@dataclass
class _Context:
    view: ConfigKind
    model: nn.Module
    groups: List[NormGroup]

    def trainable(self) -> List[NormGroup]:
        return [g for g in self.groups if g.batch_statistics]


def _leaky_head(ctx: _Context) -> List[Finding]:
    out, view = [], ctx.view
    for g in ctx.trainable():
        if g.key not in ROI_HEAD_KEYS or g.images_per_normalization > LEAK_MAX_IMAGES:
            continue
        if view.world_size > 1:
            ours = "BNConvFCHead" if g.key == "ROI_BOX_HEAD" else "BNMaskRCNNConvUpsampleHead"
            head = _head_module(ctx.model, g.key)
            name = [] if isinstance(head, (BNConvFCHead, BNMaskRCNNConvUpsampleHead)) else [(f"MODEL.{g.key}.NAME", ours)]
            fix = view.fix(*name, (f"MODEL.{g.key}.LEAKAGE_MITIGATION", "shuffle")) + "   (or syncbn)"
        else:
            fix = view.fix(("SOLVER.IMS_PER_BATCH", 2 * LEAK_MAX_IMAGES + 2)) + f"   (or a GN {g.name})"
        out.append(Finding(
            "leaky_head", g.name,
            f"its BatchNorm normalizes the RoIs of {_num(g.images_per_normalization)} image(s) per "
            f"batch statistic in training, with no leakage mitigation",
            "the RoIs of one or two images share batch statistics that carry per-image information "
            "the head learns to exploit; population statistics at inference cannot supply it "
            "(paper, Sec. 6; measured on toy data in projects/LeakageStudy)",
            fix,
        ))
    return out


def _level_statistics(ctx: _Context) -> List[Finding]:
    out, view = [], ctx.view
    for g in ctx.trainable():
        if g.consistent is not False:
            continue
        stats = [("MODEL.RETINANET.NORM_STATS", "per_level"), ("MODEL.RETINANET.POPULATION_STATS", "")]
        head = getattr(ctx.model, "head", None)
        if isinstance(head, BNRetinaNetHead):  # BNFCOSHead too
            fix = view.fix(*stats)
        else:  # a LazyConfig names the head's class; yacs, the meta-architecture
            ours = "BNFCOS" if "FCOS" in type(ctx.model).__name__ else "BNRetinaNet"
            fix = view.fix(("MODEL.META_ARCHITECTURE", ours), *stats)
        out.append(Finding(
            "level_statistics", g.name,
            f"its population statistics are not computed like its training statistics: {g.inconsistency}",
            "a head shared across FPN levels sees differently distributed features on each level; "
            "what matters is that population statistics are computed the way training statistics "
            "are (paper, Sec. 5)",
            fix,
        ))
    return out


def _ema_lag(ctx: _Context) -> List[Finding]:
    view = ctx.view
    if view.get("TEST.PRECISE_BN.ENABLED") or view.get("TEST.BN_STATS") != "population":
        return []
    max_iter = view.get("SOLVER.MAX_ITER")
    last = max([s for s in view.lr_steps() if s < max_iter], default=0)  # the last LR change
    since = max_iter - last
    out = []
    for g in ctx.trainable():
        if not g.momenta:
            continue
        stale = (1 - min(g.momenta)) ** since
        if stale > EMA_STALE_WEIGHT:
            what = "the last learning-rate step" if last else "training (its initial buffers)"
            out.append(Finding(
                "ema_lag", g.name,
                f"with EMA momentum {min(g.momenta):g} the final statistics give weight {stale:.2f} "
                f"to statistics from before {what}, {since} iterations earlier",
                "the EMA averages batch statistics of earlier weights; when the weights changed "
                "since, the population statistics lag behind them (paper, Sec. 3; projects/PreciseBN)",
                view.fix(("TEST.PRECISE_BN.ENABLED", True)),
            ))
    return out


def _few_precise_samples(ctx: _Context) -> List[Finding]:
    view = ctx.view
    samples = PreciseBNSettings.from_config(view.cfg, view.world_size).images
    if not view.get("TEST.PRECISE_BN.ENABLED") or not ctx.trainable() or samples >= PRECISE_MIN_SAMPLES:
        return []
    return [Finding(
        "few_precise_samples", "all",
        f"PreciseBN computes population statistics from {samples} images",
        "precise statistics need about 10^3 - 10^4 samples (paper, Sec. 3); fewer give noisy estimates",
        view.fix(("TEST.PRECISE_BN.NUM_SAMPLES", PRECISE_MIN_SAMPLES)),
    )]


def _per_worker_population(ctx: _Context) -> List[Finding]:
    view = ctx.view
    per_worker = [g.name for g in ctx.trainable() if g.workers_per_normalization < view.world_size]
    if view.get("BN.EMA_ACROSS_WORKERS") != "per_worker" or view.get("TEST.PRECISE_BN.ENABLED") or not per_worker:
        return []
    return [Finding(
        "per_worker_population", "all",
        f"{view.name('BN.EMA_ACROSS_WORKERS')} = 'per_worker': the running statistics of "
        f"{', '.join(per_worker)} differ by rank",
        "each rank evaluates its share of the test set with its own statistics and the checkpoint "
        "holds rank 0's, so the AP logged is not the AP of the model saved",
        view.fix(("BN.EMA_ACROSS_WORKERS", "average")) + "   (or " + view.fix(("TEST.PRECISE_BN.ENABLED", True)) + ")",
    )]


def _small_batch(ctx: _Context) -> List[Finding]:
    out, view = [], ctx.view
    for g in ctx.trainable():
        if g.key in ROI_HEAD_KEYS or g.images_per_normalization >= SMALL_BATCH_IMAGES:
            continue
        if view.images_per_worker() * view.world_size >= SMALL_BATCH_IMAGES:
            fix = view.fix((f"MODEL.{g.key}.NORM", "SyncBN"))
        else:
            fix = view.fix((f"MODEL.{g.key}.NORM", "FrozenBN")) + "   (pretrained weights; or GN)"
        out.append(Finding(
            "small_batch", g.name,
            f"its batch statistics come from {_num(g.images_per_normalization)} image(s)",
            f"batch statistics of fewer than {SMALL_BATCH_IMAGES} images are noisy estimates of the "
            "population ones, and that noise is absent at inference (paper, Sec. 5; Wu & He 2018); "
            "detectron2 freezes or synchronizes such BN for 2 images per GPU",
            fix,
        ))
    return out


def _contradictions(ctx: _Context) -> List[Finding]:
    view, out = ctx.view, []
    mini = view.get("TEST.BN_STATS") == "mini_batch"
    frozen, datasets = view.get("BN.FROZEN_LAST_ITERS"), list(view.get("TEST.PRECISE_BN.DATASETS"))
    if mini and frozen > 0:
        out.append(Finding(
            "frozen_then_mini_batch", "all",
            f"{view.name('BN.FROZEN_LAST_ITERS')} = {frozen} trains the last iterations with population "
            f"statistics, but {view.name('TEST.BN_STATS')} = 'mini_batch' evaluates with batch statistics",
            "FrozenBN late makes training use the statistics inference will use; mini-batch "
            "inference then uses others, re-creating the inconsistency FrozenBN removed (paper, Sec. 4)",
            view.fix(("TEST.BN_STATS", "population")) + "   (or " + view.fix(("BN.FROZEN_LAST_ITERS", 0)) + ")",
        ))
    if datasets and (mini or not view.get("TEST.PRECISE_BN.ENABLED")):
        why = "inference uses mini-batch statistics" if mini else "PreciseBN is off"
        out.append(Finding(
            "new_domain_unused", "all",
            f"{view.name('TEST.PRECISE_BN.DATASETS')} = {tuple(datasets)} asks for statistics of "
            f"another domain, but {why}: they are never used",
            "recomputing population statistics on the test domain only helps if inference uses them "
            "(paper, Sec. 4)",
            view.fix(("TEST.PRECISE_BN.ENABLED", True), ("TEST.BN_STATS", "population")),
        ))
    if mini and ctx.trainable():
        out.append(Finding(
            "mini_batch_inference", "all",
            f"{view.name('TEST.BN_STATS')} = 'mini_batch': an image's detections depend on the other "
            "images of its test batch",
            "mini-batch statistics at inference match training but make predictions depend on the "
            "test batch, and cannot serve images one at a time (paper, Sec. 4)",
            view.fix(("TEST.BN_STATS", "population")),
        ))
    return out


#: every audit rule: a function of the audited context returning its findings
RULES: Tuple[Callable[[_Context], List[Finding]], ...] = (
    _leaky_head, _level_statistics, _small_batch, _ema_lag, _few_precise_samples, _per_worker_population,
    _contradictions,
)


def audit_model(cfg, model: nn.Module, world_size: int = 1, config_name: str = "") -> Audit:
    """The :class:`Audit` of a model built from ``cfg`` (yacs or LazyConfig, validated for ``world_size``)."""
    view = adapt(cfg, world_size)
    groups = collect_groups(view, model)
    ctx = _Context(view, model, groups)
    findings = [f for rule in RULES for f in rule(ctx)]
    return Audit(config_name, world_size, view.images_per_worker(), view.input_size(), groups, findings)


def audit_config(config_file: str, opts: Sequence[str] = (), world_size: int = 1) -> Tuple[Audit, object, nn.Module]:
    """
    Loads and validates ``config_file`` — a yacs ``.yaml`` with ``KEY VALUE`` opts, or a
    LazyConfig ``.py`` with ``key=value`` overrides — for ``world_size`` workers (raises
    ``ValueError`` naming the key, path or file), builds its model on CPU and audits it.
    Returns (audit, cfg, model).
    """
    kind = config_kind(config_file)
    cfg = kind.load(config_file, list(opts) + kind.opts("MODEL.DEVICE", "cpu"), world_size)
    model = build_any_model(cfg)
    return audit_model(cfg, model, world_size, config_file), cfg, model
