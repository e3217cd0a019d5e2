"""
The contract of torch's CUDA batch-norm kernels, checked on CPU.

A CPU kernel accepting an argument says nothing about the CUDA kernel: CUDA's
``native_batch_norm_backward`` runs ``TORCH_INTERNAL_ASSERT(save_mean->defined())`` on every
call that does not take its fused path (``grad_input_mask[0]`` false, channels_last input,
inputs past 32-bit indexing), and allocates the weight and bias gradients with
``empty_like(weight)``; CUDA's ``native_batch_norm`` refuses eval mode without running
statistics and mixed dtypes other than (half input, float32 parameters); where the CPU
kernels accept all of these. :class:`CudaKernelContract` is a ``TorchDispatchMode`` that
records every aten op dispatched under it and the calls that break that contract, i.e. the
calls torch's own autograd never makes (read from ``aten/src/ATen/native/cuda/Normalization.cu``
and ``tools/autograd/derivatives.yaml``).
"""
from collections import Counter
from typing import List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_REDUCED = (torch.float16, torch.bfloat16)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """CUDA's accumulation type of an input dtype (``at::toAccumulateType(t, is_cuda=true)``)."""
    return torch.float32 if dtype in _REDUCED else dtype


def _mixed_dtype_problem(x: torch.Tensor, params) -> Optional[str]:
    """
    ``checkMixedDataTypes``: the defined parameters all have x's dtype, or x is
    float16/bfloat16 and they all are float32.
    """
    dtypes = {p.dtype for p in params if p is not None}
    if not dtypes or dtypes == {x.dtype} or (x.dtype in _REDUCED and dtypes == {torch.float32}):
        return None
    return f"input {x.dtype} with parameters/statistics of dtypes {sorted(map(str, dtypes))}"


def _check_forward(args) -> List[str]:
    x, weight, bias, running_mean, running_var, training = args[:6]
    problems = []
    if not training and (running_mean is None or running_var is None):
        problems.append("eval mode without running_mean/running_var (CUDA: TORCH_CHECK(has_running_mean))")
    mixed = _mixed_dtype_problem(x, (weight, bias, running_mean, running_var))
    if mixed:
        problems.append(mixed)
    return problems


def _check_backward(args) -> List[str]:
    grad_out, x, weight, running_mean, running_var, save_mean, save_invstd, train, _eps, mask = args
    problems = []
    for name, t in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        if t is None:
            problems.append(f"undefined {name} (CUDA: TORCH_INTERNAL_ASSERT({name}->defined()))")
        elif t.numel() not in (0, x.shape[1]) or (t.numel() and t.dtype != _accumulate_dtype(x.dtype)):
            problems.append(f"{name} of shape {tuple(t.shape)} and dtype {t.dtype}; autograd passes "
                            f"native_batch_norm's own ({x.shape[1]},) {_accumulate_dtype(x.dtype)} result")
    if weight is None and (mask[1] or mask[2]):
        problems.append("undefined weight with its or the bias's gradient asked for (CUDA: empty_like(weight))")
    if not train and (running_mean is None or running_var is None) and (
        save_mean is None or save_mean.numel() == 0
    ):
        problems.append("eval mode without running statistics or saved ones")
    if grad_out.dtype != x.dtype:
        problems.append(f"grad_output {grad_out.dtype} for input {x.dtype}")
    mixed = _mixed_dtype_problem(x, (weight, running_mean, running_var))
    if mixed:
        problems.append(mixed)
    return problems


_CHECKS = {
    aten.native_batch_norm.default: _check_forward,
    aten.native_batch_norm_backward.default: _check_backward,
}


class CudaKernelContract(TorchDispatchMode):
    """
    Records every aten op dispatched under it (``ops``: a Counter of op names) and, in
    ``violations``, each batch-norm call that breaks the CUDA kernels' contract (module
    docstring), as ``"op: problem"`` strings.
    """

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.violations: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func.overloadpacket.__name__)] += 1
        check = _CHECKS.get(func)
        if check is not None:
            self.violations += [f"{func}: {p}" for p in check(list(args) + list(kwargs.values()))]
        return func(*args, **kwargs)
