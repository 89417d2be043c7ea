"""Rules of the house checked statically: no module reaches into another's private names."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sources():
    for d in ("src", "bench"):
        yield from sorted((ROOT / d).rglob("*.py"))


def test_no_private_attribute_of_another_object():
    """`x._name` is allowed on `self`/`cls` (a class's own) and on module-level helpers of the
    same module; anything else is a reach into another module's or object's privates."""
    bad = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if isinstance(base, ast.Name) and base.id[:1].isupper():
                    continue  # a class's own private helper called from the same module
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not bad, "private names used across objects:\n" + "\n".join(bad)
