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


def add_settings_arg(ap) -> None:
    """--set KEY=VALUE (repeatable): a mendctl.yaml setting of the throw-away workspace."""
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a mendctl.yaml setting for the workspace (YAML value, e.g. "
                         "step_factor=1 max_steps=null preserve_keys=null: the settings before "
                         "small steps and preserved keys became the default)")


def parse_settings(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def temp_workspace(editor_dir: str | None = None, settings: dict | None = None) -> Path:
    """A fresh workspace on the default model in a temporary directory, optionally with another
    MEND editor (a path relative to the caller's directory, not the workspace's) and other
    mendctl.yaml settings (checked as mendctl checks them). Returns its root."""
    import yaml

    from mendctl.config import parse
    from mendctl.workspace import Workspace

    root = Workspace.init(Path(tempfile.mkdtemp()) / "ws")
    path = root / "mendctl.yaml"
    cfg = yaml.safe_load(path.read_text())  # a throw-away workspace: its comments can go
    if editor_dir:
        cfg["editor"] = str(Path(editor_dir).resolve())
    cfg.update(settings or {})
    parse(cfg, str(path))
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root
