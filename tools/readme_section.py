"""
Writes a benchmark's latest output into README.md, between the markers
``<!-- output:NAME -->`` and ``<!-- /output:NAME -->`` (which must already be there), so
the README always quotes what the script printed last.
"""
import os

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

__all__ = ["write_readme_section"]


def write_readme_section(name: str, text: str, readme: str = README) -> None:
    """
    Replaces what stands between the two markers of ``name`` in ``readme`` by ``text``.

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
