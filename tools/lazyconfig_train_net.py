#!/usr/bin/env python
"""Thin wrapper: ``python tools/lazyconfig_train_net.py ...`` runs :mod:`d2_batchnorm.cli.lazyconfig_train_net` (its docstring is the manual)."""
import sys

from d2_batchnorm.cli.lazyconfig_train_net import cli

if __name__ == "__main__":
    sys.exit(cli())
