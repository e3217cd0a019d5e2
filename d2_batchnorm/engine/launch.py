"""
Starting worker processes through torch.distributed, the way detectron2 does:
:func:`launch` (also under ``torchrun``), :func:`launch_cli` (the command line of
tools/train_net.py and tools/lazyconfig_train_net.py) and :func:`run_on_local_workers`
(N local gloo processes, for the tests and the benchmarks).
"""
import contextlib
import ctypes
import io
import ipaddress
import os
import queue
import signal
import sys
import traceback
from datetime import timedelta
from typing import Optional
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import default_argument_parser
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

from ..data import prepare_datasets
from ..config_kinds import adapt
from .defaults import check_weights

__all__ = ["check_launch_args", "launch", "launch_cli", "launched_by_torchrun", "run_on_local_workers", "uses_cuda"]


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (it sets these variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def uses_cuda(device: str) -> bool:
    """
    True when workers for a config whose device is ``device`` ("cuda", "cuda:1", "cpu")
    run on GPUs over NCCL; False when they are CPU processes over gloo: without CUDA, or
    when the config asks for the CPU on a machine with GPUs.
    """
    return str(device).startswith("cuda") and torch.cuda.is_available()


@contextlib.contextmanager
def _cuda_hidden_from_new_processes(hide: bool):
    """
    While open and ``hide`` is True, processes started from here see no GPU
    (``CUDA_VISIBLE_DEVICES=""``), so detectron2's launcher gives CPU workers gloo instead
    of NCCL; the variable is restored afterwards.
    """
    if not hide:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _init_from_torchrun_env(cuda: bool) -> None:
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, init_method="env://")
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    threads = _cpu_threads_per_worker(local_size, cuda)
    if threads is not None:
        torch.set_num_threads(threads)
    comm.create_local_process_group(local_size)
    comm.synchronize()


def _cpu_threads_per_worker(host_workers: int, cuda: bool) -> Optional[int]:
    """
    Torch threads for each of ``host_workers`` CPU workers on this host: its share of the
    cores, so N workers with torch's default of one thread per core do not oversubscribe
    them N times. None when there is nothing to decide: GPU workers (``cuda``), one
    worker, or ``OMP_NUM_THREADS`` set (it wins).
    """
    if cuda or host_workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // host_workers)


def _worker(main_func, launcher_pid: int, threads: Optional[int], *args):
    """
    Runs ``main_func(*args)`` in a worker started by :func:`launch`: with ``threads`` torch
    threads (a CPU worker's share of the cores) when given, and, when it is a process of its
    own (one worker runs in the launcher), bound to the launcher's life (:func:`_die_with_launcher`).
    """
    if os.getpid() != launcher_pid:
        _die_with_launcher(launcher_pid)
    if threads is not None:
        torch.set_num_threads(threads)
    return main_func(*args)


def _die_with_launcher(launcher_pid: int) -> None:
    """
    Makes this worker receive SIGTERM when the launcher process dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), and exits at once if it is already gone. torch's spawn asks
    for SIGINT instead, which Python delivers as a KeyboardInterrupt that code may catch or
    ignore; a launcher killed from outside (a timeout, ``kill``, a job scheduler) then left
    its workers training on here, writing into an output folder a re-run was using.
    """
    if sys.platform.startswith("linux"):
        # without prctl (OSError, AttributeError) the worker outlives its launcher, as before
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    if os.getppid() != launcher_pid:
        os._exit(1)


def _loopback(dist_url: str) -> bool:
    """True when ``dist_url`` (e.g. ``tcp://127.0.0.1:PORT``) names this host's loopback
    address: then every "machine" of the job runs on this host."""
    host = urlparse(dist_url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_launch_args(num_gpus_per_machine: int, num_machines: int = 1, device: Optional[str] = "cuda") -> None:
    """
    Raises ``ValueError`` naming ``--num-gpus`` / ``--num-machines`` when they are < 1, or
    when ``--num-gpus`` exceeds the GPUs present and the workers would use them
    (:func:`uses_cuda` of ``device``; None: the device is not known yet, skip that check).
    """
    for flag, value in (("--num-gpus", num_gpus_per_machine), ("--num-machines", num_machines)):
        if value < 1:
            raise ValueError(f"{flag} = {value} is not allowed; it must be >= 1")
    if device is not None and uses_cuda(device) and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus = {num_gpus_per_machine} but this machine has only "
            f"{torch.cuda.device_count()} GPU(s); to run CPU processes instead, set the config's device to 'cpu'"
        )


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args=(), device: str = "cuda"):
    """
    Runs ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of
    ``num_machines`` machines, on GPUs over NCCL when ``device`` (the config's) is a CUDA
    device and CUDA is available. Otherwise — no CUDA, or ``device="cpu"`` on a machine
    with GPUs, which the workers then do not see — the processes run on CPU over gloo, each with
    ``cpu_count // W`` torch threads unless ``OMP_NUM_THREADS`` is set, where W counts every
    worker on this host: ``num_gpus_per_machine``, times ``num_machines`` when ``dist_url``
    is a loopback address (machines simulated on one host, each its own launcher).
    Under ``torchrun`` (or a submitit job, which exports the same variables) the process
    group comes from the environment, each CPU worker gets its share of the cores by
    ``LOCAL_WORLD_SIZE``, and the other arguments are ignored. Workers end when the
    launcher dies (:func:`_die_with_launcher`).

    Raises:
        ValueError: see :func:`check_launch_args`.
    """
    cuda = uses_cuda(device)
    if launched_by_torchrun():
        _init_from_torchrun_env(cuda)
        return main_func(*args)
    check_launch_args(num_gpus_per_machine, num_machines, device)
    threads = _cpu_threads_per_worker(
        num_gpus_per_machine * (num_machines if _loopback(dist_url) else 1), cuda
    )
    with _cuda_hidden_from_new_processes(not cuda and torch.cuda.is_available()):
        return d2_launch(_worker, num_gpus_per_machine, num_machines=num_machines, machine_rank=machine_rank,
                         dist_url=dist_url, args=(main_func, os.getpid(), threads) + tuple(args))


def launch_cli(main_func, load_config, argv=None) -> int:
    """
    Parses detectron2's training arguments (``default_argument_parser``) from ``argv`` and
    fails fast in this process, before any worker starts and before anything is written
    into the output directory: ``load_config(args.config_file, args.opts, world_size)``
    (a bad config), the checkpoint it will load and its datasets. A ``ValueError`` ends the
    run with one ``error: ...`` line on stderr and exit status 2. Then runs
    ``main_func(args)`` in every worker (:func:`launch`), on the config's device
    (``MODEL.DEVICE``, ``train.device``): GPUs, or CPU processes. The world size
    is ``--num-gpus × --num-machines`` (checked), or torchrun's ``WORLD_SIZE``. detectron2's
    default ``--dist-url`` (one fixed port per user) becomes "auto" on one machine, so two
    jobs at once do not collide. Returns the exit status.
    """
    parser = default_argument_parser()
    args = parser.parse_args(argv)
    if args.dist_url == parser.get_default("dist_url") and args.num_machines == 1:
        args.dist_url = "auto"
    print("Command Line Args:", args)
    try:  # under torchrun every process checks; dataset generation is safe to race
        if launched_by_torchrun():  # the environment gives the workers
            world_size = int(os.environ["WORLD_SIZE"])
        else:
            check_launch_args(args.num_gpus, args.num_machines, device=None)
            world_size = args.num_gpus * args.num_machines
        cfg = load_config(args.config_file, args.opts, world_size)
        kind = adapt(cfg)
        device = kind.get("MODEL.DEVICE")
        if not launched_by_torchrun():  # now that the device is known: GPUs enough?
            check_launch_args(args.num_gpus, args.num_machines, device)
        check_weights(cfg, resume=args.resume)
        prepare_datasets(kind.dataset_names())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch(main_func, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,), device=device)
    return 0


def _local_worker(rank, world_size, port, fn, args, queue):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(minutes=5))
        comm.create_local_process_group(world_size)
        torch.manual_seed(rank)
        # serialized here: torch's multiprocessing would share tensors through file
        # descriptors that die with this process before the parent reads them
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_local_workers(fn, world_size: int = 2, args=(), timeout: float = 600.0, context=None):
    """
    Runs ``fn(*args)`` in ``world_size`` new CPU processes that form a gloo process group
    (detectron2's ``comm`` helpers work in them), and returns ``[result of rank 0, ...]``.
    ``fn`` must be picklable (a module-level function); results may hold tensors. Raises
    ``RuntimeError`` with the worker's traceback if any rank fails, or with its exit code if
    a worker dies without reporting (killed, or unable to start: e.g. a script without an
    ``if __name__ == "__main__":`` guard), instead of waiting for it forever.

    ``context``: the multiprocessing context that starts the workers (default "spawn": a
    fresh interpreter, which imports torch and detectron2 again, seconds per call). Many
    calls from one process go faster with a "forkserver" context whose
    ``set_forkserver_preload`` names those modules: each worker is then forked, still fresh,
    from a server that imported them once (the test suite does this).
    """
    ctx = context or mp.get_context("spawn")
    results_queue = ctx.Queue()
    port = _find_free_port()
    procs = [
        ctx.Process(target=_local_worker, args=(r, world_size, port, fn, args, results_queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        while len(results) < world_size and not errors:
            try:
                rank, ok, payload = results_queue.get(timeout=1.0)
            except queue.Empty:
                for rank, p in enumerate(procs):  # a worker that died cannot report any more
                    if rank not in results and p.exitcode not in (None, 0):
                        errors[rank] = f"the worker exited with code {p.exitcode} before reporting a result"
                continue
            (results if ok else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=timeout if not errors else 5)
            if p.is_alive():
                p.terminate()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world_size)]
