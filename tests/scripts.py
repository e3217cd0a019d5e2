"""Loads a tool or project script of this repository (not a package) as a module."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str, name: str = ""):
    """
    The module of ``<repo>/<relative_path>``, executed once per call; the
    package ``d2_batchnorm`` is imported as any installed package.
    """
    path = os.path.join(REPO, relative_path)
    spec = importlib.util.spec_from_file_location(name or os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
