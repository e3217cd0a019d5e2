"""Loads a tool or project script of this repository (not a package) as a module."""
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str, name: str = ""):
    """
    The module of ``<repo>/<relative_path>``, executed once per call. Its folder goes on
    ``sys.path`` as when it runs as a script (tools import their neighbours, e.g. compare).
    """
    path = os.path.join(REPO, relative_path)
    if os.path.dirname(path) not in sys.path:
        sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(name or os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
