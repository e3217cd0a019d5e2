"""
NonFiniteGuard: a training step with non-finite gradients (the step AMP's GradScaler would
skip) leaves torch's BatchNorm buffers as they were, so a NaN injected into one batch gives
the running statistics of the run without that batch.
"""
import copy

import pytest
import torch
from detectron2.engine import SimpleTrainer
from torch import nn

from d2_batchnorm.engine.bn_guard import NonFiniteGuard

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _Net(nn.Module):
    """conv -> nn.BatchNorm2d; the loss ignores non-finite outputs (``nan_to_num``), so a
    NaN batch gives a finite loss and NaN gradients, like an overflow under AMP's scaling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return {"loss": torch.nan_to_num(self.bn(self.conv(x)), 0.0, 0.0, 0.0).square().mean()}


class _SkipNonFiniteSGD(torch.optim.SGD):
    """SGD that skips a step whose gradients are not finite, as GradScaler.step does."""

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False))):
            return None
        return super().step(closure)


def _batches(poison: bool):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 2, 3, 3, generator=g) + 2 for _ in range(3)]
    if poison:
        xs[1][0, 1, 2, 2] = float("nan")
        return xs
    return [xs[0], xs[2]]


def _train(model, batches, guard: bool):
    optimizer = _SkipNonFiniteSGD(model.parameters(), lr=0.1)
    trainer = SimpleTrainer(model, batches, optimizer)
    hook = NonFiniteGuard(model) if guard else None
    trainer.register_hooks([hook])
    trainer.train(0, len(batches))
    return hook


@pytest.mark.parametrize("poison", [True, False])
def test_nonfinite_step_leaves_torch_bn_buffers_as_without_that_batch(poison):
    """With a NaN batch: the buffers and weights of the run without it, one step restored;
    without one: the guard changes nothing."""
    torch.manual_seed(0)
    model = _Net()
    reference = copy.deepcopy(model)
    hook = _train(model, _batches(poison=poison), guard=True)
    _train(reference, _batches(poison=False), guard=False)
    for k in BUFFERS:
        assert torch.equal(getattr(model.bn, k), getattr(reference.bn, k)), k
    for (k, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), k
    assert int(hook.restored_steps) == int(poison)
