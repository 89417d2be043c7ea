"""Shared bits of the benchmark scripts: a throw-away workspace, a table printer, JSON output,
peak memory."""
from __future__ import annotations

import json
import resource
import sys
import tempfile
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(rows: list[dict], cols: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w[i]) for i, x in enumerate(xs))  # noqa: E731
    return "\n".join([line(cols), line(["-" * n for n in w])] + [line(x) for x in cells])


def write_json(path: str | Path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def temp_workspace(editor_dir: str | None = None, guard_norm: float | None | str = "keep",
                   protect: bool | None = None) -> Path:
    """A fresh workspace on the default model in a temporary directory, optionally with another
    MEND editor (a path relative to the caller's directory, not the workspace's), another
    `guard_norm` (None: no guard) and another `protect_edits`. Returns its root."""
    import yaml

    from mendctl.workspace import Workspace

    root = Workspace.init(Path(tempfile.mkdtemp()) / "ws")
    path = root / "mendctl.yaml"
    cfg = yaml.safe_load(path.read_text())  # a throw-away workspace: its comments can go
    if editor_dir:
        cfg["editor"] = str(Path(editor_dir).resolve())
    if guard_norm != "keep":
        cfg["guard_norm"] = guard_norm
    if protect is not None:
        cfg["protect_edits"] = protect
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root
