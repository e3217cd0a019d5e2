"""
What every benchmark in tools/ reports besides its own numbers: the machine it ran on
(:func:`machine_description`), and its latest output written into docs/benchmarks.md
between the markers ``<!-- output:NAME -->`` and ``<!-- /output:NAME -->``
(:func:`write_section`), so the page always quotes what the script printed last.
"""
import os
import platform

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")

__all__ = ["machine_description", "write_section"]


def machine_description(detail: str = "") -> str:
    """
    "CPU model, N logical CPUs, load average L at start, Python X, torch Y[, detail]" — the
    load average tells how shared the machine was when the timings were taken.
    """
    import torch

    cpu = platform.processor() or platform.machine() or "unknown CPU"
    if os.path.isfile("/proc/cpuinfo"):  # Linux: the model name
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (f"{cpu}, {os.cpu_count()} logical CPUs, load average {load:.1f} at start, "
            f"Python {platform.python_version()}, torch {torch.__version__}")
    return f"{text}, {detail}" if detail else text


def write_section(name: str, text: str, readme: str = BENCHMARKS) -> None:
    """
    Replaces what stands between the two markers of ``name`` in ``readme`` (default:
    docs/benchmarks.md) by ``text``.

    Raises:
        ValueError: the markers are missing or out of order (the file is left as it was).
    """
    begin, end = f"<!-- output:{name} -->", f"<!-- /output:{name} -->"
    with open(readme) as f:
        content = f.read()
    i, j = content.find(begin), content.find(end)
    if i < 0 or j < i:
        raise ValueError(f"{readme} has no '{begin}' ... '{end}' block for {name}'s output")
    content = content[: i + len(begin)] + "\n" + text.strip() + "\n" + content[j:]
    with open(readme, "w") as f:
        f.write(content)
    print(f"(written into {readme}, block {name!r})")
