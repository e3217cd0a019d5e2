"""Command lines of d2_batchnorm (``tools/*.py`` are thin wrappers around them)."""
