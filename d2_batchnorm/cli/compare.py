"""
Compares detection runs: a Markdown and a CSV table of bbox/segm AP and a PNG bar chart.

    python tools/compare.py [--num-gpus 2] [--out DIR] [--seeds K [--baseline LABEL]] \
        RUN [RUN ...] [-- KEY VALUE ... key=value ...]

Each RUN is ``[LABEL=]PATH``:

* a config file: a yacs ``.yaml`` is trained and evaluated by ``tools/train_net.py``, a
  LazyConfig ``.py`` by ``tools/lazyconfig_train_net.py``, with ``--num-gpus N`` into
  ``DIR/runs/<LABEL>``, then read like a directory. The options after ``--`` go to every
  such run: yacs ``KEY VALUE`` pairs (to a LazyConfig run as their ``train.*`` names, for
  the keys of ``d2_batchnorm.config.SETTINGS``, e.g. ``SOLVER.MAX_ITER`` is
  ``train.max_iter``) and LazyConfig ``key=value`` overrides (to LazyConfig runs only);
* a finished (or failed, or unfinished) output directory: read as it is.

From a directory it reads ``config.yaml`` (written by either tool) for what the run is —
the heads' leakage mitigation and which statistics inference used — and its results:
the last ``bbox/AP`` / ``segm/AP`` of ``metrics.json`` (with PreciseBN, the AP with
precise statistics, and ``ema/bbox/AP`` / ``ema/segm/AP``, the AP with the EMA statistics
before they were replaced), or, for ``--eval-only`` runs, which write no metrics.json, the
``copypaste`` lines of ``log.txt``. Every run is a row with a status — ``ok``, ``failed``
(non-zero exit, or a traceback in its log), ``unfinished`` (no AP yet), ``missing`` (no
such directory) or ``corrupt`` (a metrics.json or config.yaml that cannot be read: not
UTF-8, a line of metrics.json that is not a JSON object, a config that is not a YAML
mapping; the detail names the file and why) — never dropped.

Writes ``DIR/compare.md``, ``DIR/compare.csv`` and ``DIR/compare.png`` and prints the
Markdown table. Exits 0 when every run has its AP, 1 otherwise, 2 on bad arguments.

Seeds and spread. ``--seeds K`` (seeds 1..K) or ``--seeds S1,S2,...`` runs every config
once per seed (``SEED`` set explicitly) into ``DIR/runs/<LABEL>/seed<S>``; a directory
holding such ``seed<S>`` folders is read the same way. The table then has one row per
variant with mean ± sample standard deviation over its ok runs and the per-seed values,
the CSV one row per run (with its seed), the plot error bars and one dot per seed. All
variants of one seed start from the same seed, so with ``--baseline LABEL`` each variant
also gets its paired difference to LABEL (per seed, then mean ± sd): the spread that
matters for "is A better than B"; a line after the table says which differences are
beyond their spread (all seeds agree in sign and |mean| > sd).

Resuming. A config run whose folder holds a finished run (status ok) of the same request
(config, options, seed, processes; recorded in ``compare_request.json``) is reused, and
said so; a missing, failed, unfinished, corrupt or differently requested run is deleted
and run again. Re-running an interrupted command therefore only runs what is left.

On a cluster. ``--launcher submitit --cluster slurm`` submits the runs as one SLURM job
array (``--nodes`` × ``--tasks-per-node`` processes and ``--gpus-per-node`` GPUs per job,
``--max-parallel`` at a time) and waits for them; a refused submission is one ``error:``
line, a cancelled or timed-out job a row that says so, a preempted one resumes; a re-run
also waits for jobs an earlier call left running. docs/slurm.md has the COCO command and
a single-node SLURM to try it on (tools/local_slurm.sh).
"""
import argparse
import math
import os
import shutil
import sys
from typing import List, Tuple

import torch

from d2_batchnorm.checks import check_int
from d2_batchnorm.engine.cluster import CLUSTERS, SubmissionRefused, partition_gpus
from d2_batchnorm.experiments import (CONFIG_SUFFIXES, LocalLauncher, SubmititLauncher, paired_summary,
                                      parse_seeds, plot, read_dir, run_all, split_opts, train_command,
                                      write_seed_tables, write_tables)


def _parse_run(spec: str) -> Tuple[str, str]:
    label, sep, path = spec.partition("=")
    if sep and label and not os.path.exists(spec):
        return label, path
    return os.path.splitext(os.path.basename(os.path.normpath(spec)))[0], spec


def submitit_resources(args) -> dict:
    """
    What each job of ``--launcher submitit`` asks for, from the command line: nodes, tasks
    per node, GPUs per node (by default one per task on a SLURM partition with GPU GRES, none
    on a CPU partition or without GRES; locally, where CUDA is), time limit, partition, CPUs
    per task, array cap and requeues. ``ValueError`` naming the flag for what cannot work.
    """
    gpus = args.gpus_per_node
    if gpus is None and args.cluster == "slurm":
        gpus = args.num_gpus if partition_gpus(args.partition or None) > 0 else 0
    elif gpus is None:
        gpus = args.num_gpus if torch.cuda.is_available() else 0
    tasks = args.tasks_per_node or gpus or args.num_gpus
    if args.cluster == "local" and args.nodes != 1:
        raise ValueError(f"--nodes = {args.nodes} is not allowed with --cluster local; it must be 1")
    return dict(nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=gpus,
                timeout_min=args.timeout_min or max(1, math.ceil(args.timeout / 60)),
                partition=args.partition or None, cpus_per_task=args.cpus_per_task or None,
                max_parallel=args.max_parallel or None, max_requeues=args.max_requeues)


def _describe_resources(r: dict) -> str:
    text = (f"{r['nodes']} node(s) x {r['tasks_per_node']} task(s), {r['gpus_per_node']} GPU(s) per node, "
            f"{r['timeout_min']} min")
    extras = [f"{k}={r[k]}" for k in ("partition", "cpus_per_task", "max_parallel") if r[k]]
    return ", ".join([text] + extras) + f", requeued up to {r['max_requeues']} time(s)"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, opts = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]RUN", help="config .yaml to run, or output directory to read")
    parser.add_argument("--out", default="output/compare", help="folder for compare.{md,csv,png} and for the runs of configs")
    parser.add_argument("--num-gpus", type=int, default=2, help="processes per run of a config (CPU processes without CUDA)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each run of a config")
    parser.add_argument("--title", default="", help="title of the chart")
    parser.add_argument("--seeds", default="", metavar="K | S1,S2,...",
                        help="run every config with these SEEDs (K: seeds 1..K); the table gives "
                             "mean ± sd per variant, the CSV one row per run")
    parser.add_argument("--baseline", default="", metavar="LABEL",
                        help="with seeds: also report each variant's paired difference to LABEL")
    parser.add_argument("--launcher", choices=("local", "submitit"), default="local",
                        help="local: train_net.py processes here, one run after the other; submitit: "
                             "one job per run (and seed) on --cluster, all submitted at once (a SLURM job array)")
    cluster = parser.add_argument_group("submitit launcher")
    cluster.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                         help="slurm (sbatch), local (processes on this machine) or debug")
    cluster.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    cluster.add_argument("--nodes", type=int, default=1, help="nodes per job")
    cluster.add_argument("--tasks-per-node", type=int, default=0,
                         help="training processes per node; default: --gpus-per-node when GPUs are asked, "
                              "else --num-gpus")
    cluster.add_argument("--gpus-per-node", type=int, default=None,
                         help="GPUs asked per node; 0 for CPU partitions; default: --num-gpus on a partition "
                              "with GPU GRES (one task per GPU), else 0")
    cluster.add_argument("--timeout-min", type=int, default=0, help="job time limit; default --timeout")
    cluster.add_argument("--cpus-per-task", type=int, default=0, help="SLURM --cpus-per-task")
    cluster.add_argument("--max-parallel", type=int, default=0,
                         help="at most this many jobs of the array run at once (default: no cap)")
    cluster.add_argument("--max-requeues", type=int, default=3,
                         help="times a preempted or timed-out job is requeued to resume (submitit's max_num_timeout)")
    args = parser.parse_args(argv)
    specs = [_parse_run(s) for s in args.runs]
    labels = [label for label, _ in specs]
    try:
        for flag, value, minimum in (("--num-gpus", args.num_gpus, 1), ("--nodes", args.nodes, 1),
                                     ("--tasks-per-node", args.tasks_per_node, 0),
                                     ("--gpus-per-node", 0 if args.gpus_per_node is None else args.gpus_per_node, 0),
                                     ("--timeout-min", args.timeout_min, 0),
                                     ("--cpus-per-task", args.cpus_per_task, 0),
                                     ("--max-parallel", args.max_parallel, 0),
                                     ("--max-requeues", args.max_requeues, 0)):
            check_int(flag, value, minimum)
        seeds = parse_seeds(args.seeds)
        split_opts(opts)
        for _, path in specs:
            if path.endswith(CONFIG_SUFFIXES):  # options a run cannot take, before any run
                train_command(path, args.out, opts + (["SEED", "1"] if seeds else []))
        if args.launcher == "submitit" and args.cluster == "slurm" and not shutil.which("srun"):
            raise ValueError("--cluster slurm needs SLURM (srun, sbatch) on this machine's PATH; they were not "
                             "found (--cluster local runs the jobs as processes here)")
        if len(set(labels)) != len(labels):
            raise ValueError(f"run labels must be unique; got {labels} (name them LABEL=PATH)")
        for label, path in specs:
            if path.endswith(CONFIG_SUFFIXES) and not os.path.isfile(path):
                raise ValueError(f"config file {path!r} (run {label!r}) does not exist")
        if args.baseline and args.baseline not in labels:
            raise ValueError(f"--baseline = {args.baseline!r} is not allowed; it must be one of the run labels "
                             f"{labels}")
        os.makedirs(args.out, exist_ok=True)
        resources = submitit_resources(args) if args.launcher == "submitit" else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.launcher == "submitit":
        launcher = SubmititLauncher(args.cluster, os.path.join(args.out, "submitit"), **resources)
        print(f"[compare] each job ({args.cluster}): {_describe_resources(resources)}", flush=True)
    else:
        launcher = LocalLauncher(args.num_gpus, args.timeout)
    tasks = []
    for label, path in specs:
        if path.endswith(CONFIG_SUFFIXES):
            runs_dir = os.path.join(args.out, "runs", label)
            tasks += ([(label, path, runs_dir, None)] if not seeds else
                      [(label, path, os.path.join(runs_dir, f"seed{s}"), s) for s in seeds])
    try:
        by_dir = {t[2]: r for t, r in zip(tasks, run_all(tasks, launcher, opts))}
    except SubmissionRefused as e:
        print(f"error: {args.cluster} refused the jobs: {e}", file=sys.stderr)
        return 2

    runs = []
    for label, path in specs:
        if not path.endswith(CONFIG_SUFFIXES):
            runs += read_dir(path, label)
        else:
            runs += [by_dir[t[2]] for t in tasks if t[0] == label]

    if any(r.seed is not None for r in runs):  # --seeds, or directories of seed<S> runs
        markdown = write_seed_tables(runs, args.out, args.baseline or None)
    else:
        markdown = write_tables(runs, args.out)
    plot(runs, os.path.join(args.out, "compare.png"), args.title)
    print(markdown)
    if args.baseline and any(r.seed is not None for r in runs):
        print(f"[compare] {paired_summary(runs, args.baseline)}")
    print(f"[compare] wrote {os.path.join(args.out, 'compare.md')}, compare.csv, compare.png")
    return 0 if all(r.status == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
