from setuptools import find_packages, setup

setup(
    name="d2_batchnorm",
    version="0.1.0",
    description="Correct, consistent and measurable BatchNorm for Detectron2",
    packages=find_packages(include=["d2_batchnorm", "d2_batchnorm.*"]),
    python_requires=">=3.8",
    # detectron2 is not on PyPI under its own name: see README.md (Installation).
    install_requires=["fvcore", "iopath", "pycocotools", "yacs", "tabulate", "matplotlib", "submitit>=1.5"],
)
