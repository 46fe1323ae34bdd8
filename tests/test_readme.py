"""The README describes the tree as it is."""

from __future__ import annotations


def test_the_readme_layout_lists_every_module_where_it_is():
    """The README's layout block names every module of driver_ctr/ under its package, and nothing else."""
    import re

    from conftest import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Layout\n") :]
    block = section[section.index("```\n") + 4 :]
    block = block[: block.index("```")]
    documented = set()
    stack = []  # (indent, directory)
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        first = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if first.endswith("/"):
            stack.append((indent, first.rstrip("/")))
            continue
        here = "/".join(d for _, d in stack)
        documented |= {"%s/%s" % (here, m) for m in re.findall(r"\b(\w+\.py)\b", line)}
    actual = {str(p.relative_to(REPO)) for p in (REPO / "driver_ctr").rglob("*.py") if "__pycache__" not in p.parts}
    assert documented <= actual, sorted(documented - actual)
    assert sorted(p for p in actual - documented if not p.endswith(("__init__.py", "__main__.py"))) == []
