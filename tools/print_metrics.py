#!/usr/bin/env python
"""
Prints the evaluation results of finished runs as a table: the last record of each
``metrics.json`` that holds COCO metrics (``bbox/AP``, ``segm/AP``, and their ``ema/``
twins when PreciseBN evaluated both statistics).

    python tools/print_metrics.py OUTPUT_DIR [OUTPUT_DIR ...]

Exits with status 1 when a directory has no evaluation results.
"""
import argparse
import json
import os
import sys

from tabulate import tabulate

KEYS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")


def last_eval_record(output_dir: str):
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    found = None
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if any(k.endswith(KEYS) for k in record):
                found = record
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dirs", nargs="+")
    args = parser.parse_args(argv)
    rows, ok = [], True
    for d in args.output_dirs:
        record = last_eval_record(d)
        if record is None:
            rows.append([d, "no evaluation results (failed or unfinished)"])
            ok = False
            continue
        metrics = {k: v for k, v in sorted(record.items()) if k.endswith(KEYS)}
        rows.append([d, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())])
    print(tabulate(rows, headers=["run", "COCO metrics (last evaluation)"], tablefmt="github"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
