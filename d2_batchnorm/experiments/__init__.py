"""
Comparisons of detection runs: :mod:`.runs` reads a run's output directory,
:mod:`.launchers` trains configs (locally or through submitit) and reuses finished runs,
:mod:`.stats` gives the spread over seeds, :mod:`.reports` writes the Markdown/CSV tables
and the chart. ``d2bn compare`` (``tools/compare.py``) is their command line.
"""
from .launchers import (CONFIG_SUFFIXES, REQUEST_FILE, LocalLauncher, SubmititLauncher, reusable_run, run_all,
                        run_config, split_opts, train_command)
from .reports import paired_summary, plot, write_seed_tables, write_tables
from .runs import (COLUMNS, METRICS, CorruptFile, RunResult, box_ap, copypaste_blocks, read_dir, read_run, status_text,
                   training_progress)
from .stats import beyond_spread, by_label, mean_sd, ok_values, paired_differences, parse_seeds

__all__ = [k for k in globals() if not k.startswith("_")]
