#!/usr/bin/env python
"""Thin wrapper: ``python tools/bn_audit.py ...`` runs :mod:`d2_batchnorm.cli.bn_audit` (its docstring is the manual)."""
import sys

from d2_batchnorm.cli.bn_audit import cli

if __name__ == "__main__":
    sys.exit(cli())
