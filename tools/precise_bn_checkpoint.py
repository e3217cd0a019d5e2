#!/usr/bin/env python
"""Thin wrapper: ``python tools/precise_bn_checkpoint.py ...`` runs :mod:`d2_batchnorm.cli.precise_bn_checkpoint` (its docstring is the manual)."""
import sys

from d2_batchnorm.cli.precise_bn_checkpoint import cli

if __name__ == "__main__":
    sys.exit(cli())
