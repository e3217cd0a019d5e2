#!/usr/bin/env python
"""Thin wrapper: ``python tools/check_gpu.py ...`` runs :mod:`d2_batchnorm.cli.check_gpu` (its docstring is the manual)."""
import sys

from d2_batchnorm.cli.check_gpu import main

if __name__ == "__main__":
    sys.exit(main())
