#!/usr/bin/env python
"""Thin wrapper: ``python tools/compare.py ...`` runs :mod:`d2_batchnorm.cli.compare` (its docstring is the manual)."""
import sys

from d2_batchnorm.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
