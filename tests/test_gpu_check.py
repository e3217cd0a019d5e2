"""
d2_batchnorm.gpu_check and tools/check_gpu.py: the checks pass on CPU (gloo, bfloat16
autocast; the torch-kernel reference of the synchronized path needs CUDA), the tool says
"no CUDA" in one line where there is none, and the ``cuda`` tests run the same checks on a
GPU (``pytest -m cuda``; skipped without CUDA).
"""
import os
import subprocess
import sys

import pytest
import torch

from d2_batchnorm import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")


def _assert_all_pass(results):
    failed = [r for r in results if not r.passed]
    assert not failed, gpu_check.format_table(failed)


def test_checks_pass_on_cpu():
    results = gpu_check.run_all(torch.device("cpu"))
    names = " ".join(r.name for r in results)
    for expected in ("SyncBatchNorm over a 1-process gloo group", "LevelBatchNorm per_level", "LevelBatchNorm shared", "GhostBatchNorm",
                     "PreciseBN", "RoI shuffle", "bfloat16 autocast", "channels_last"):
        assert expected in names
    _assert_all_pass(results)
    assert "| PASS" in gpu_check.format_table(results)


def test_a_wrong_result_fails_its_check():
    ok = gpu_check._error([torch.ones(3)], [torch.ones(3)])
    off = gpu_check._error([torch.tensor([1.0, 2.0])], [torch.tensor([1.0, 2.1])])
    assert ok == 0.0 and off == pytest.approx(0.1 / 2.1)
    assert not gpu_check.CheckResult("x", float("nan"), 1.0).passed
    assert not gpu_check.CheckResult("x", gpu_check._error([torch.tensor([float("nan")])], [torch.ones(1)]), 1.0).passed


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_tool_says_no_cuda_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "check_gpu.py"), "--output", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line and "warnings.warn" not in line]
    assert len(lines) == 1 and lines[0].startswith("no CUDA"), proc.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.cuda
@needs_cuda
def test_norms_precise_bn_and_shuffle_on_cuda():
    _assert_all_pass(gpu_check.run_all(torch.device("cuda")))


@pytest.mark.cuda
@needs_cuda
def test_amp_training_on_one_gpu():
    _assert_all_pass(gpu_check.training_checks())
