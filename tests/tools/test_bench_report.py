"""tools/bench_report.py: benchmarks write their latest output into docs/benchmarks.md."""
import os

import pytest

from scripts import load_script

bench_report = load_script("tools/bench_report.py")
BENCHMARKS, machine_description, write_section = (
    bench_report.BENCHMARKS, bench_report.machine_description, bench_report.write_section)


def test_replaces_only_the_named_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- output:x -->\nold\n<!-- /output:x -->\nb\n<!-- output:y -->\nkeep\n<!-- /output:y -->\n")
    write_section("x", "new table\n", str(readme))
    assert readme.read_text() == (
        "a\n<!-- output:x -->\nnew table\n<!-- /output:x -->\nb\n<!-- output:y -->\nkeep\n<!-- /output:y -->\n"
    )


def test_missing_markers_leave_the_file_unchanged(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- /output:x -->\n<!-- output:x -->\n")
    with pytest.raises(ValueError, match="no '<!-- output:x -->'"):
        write_section("x", "t", str(readme))
    assert readme.read_text() == "<!-- /output:x -->\n<!-- output:x -->\n"


def test_every_benchmark_has_its_block_in_the_benchmarks_page():
    text = open(BENCHMARKS).read()
    for name in ("bench_norms", "bench_shuffle", "bench_precise_bn", "bench_monitor"):
        assert f"<!-- output:{name} -->" in text and f"<!-- /output:{name} -->" in text


def test_machine_description_names_cpus_load_and_versions():
    import torch

    text = machine_description("gloo")
    assert f"{os.cpu_count()} logical CPUs" in text and "load average" in text
    assert f"torch {torch.__version__}" in text and text.endswith(", gloo")
