#!/usr/bin/env python
"""Thin wrapper: ``python tools/export_model.py ...`` runs :mod:`d2_batchnorm.cli.export_model` (its docstring is the manual)."""
import sys

from d2_batchnorm.cli.export_model import main

if __name__ == "__main__":
    sys.exit(main())
