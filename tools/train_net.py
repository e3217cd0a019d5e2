#!/usr/bin/env python
"""Thin wrapper: ``python tools/train_net.py ...`` runs :mod:`d2_batchnorm.cli.train_net` (its docstring is the manual)."""
import sys

from d2_batchnorm.cli.train_net import cli

if __name__ == "__main__":
    sys.exit(cli())
