"""Sequential editing: chains of T distinct test-split edits on the default model, recorded in a
real workspace (ledger + delta store) exactly as `mendctl edit` records them, then audited.

Both protocols of the field, labelled:
- immediate: each edit scored right after it was applied (its ledger row's `metrics_after`:
  edit success, paraphrase success, and locality of that edit against the state before it);
- final: all edits scored on the final model (`mendctl audit`: retention of every edit and
  its paraphrases, and locality of every edit's own prompts against the base model).
The retention matrix of the longest chain is drawn as the audit report draws it.

Usage: python bench/sequential.py [--lengths 1,10,100] [--editors mend,ft_kl] [--protect on|off]
       [--max-steps N] [--set KEY=VALUE ...]
       [--out bench/results/sequential.json] [--plot docs/sequential.png] [--report DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_settings_arg, parse_settings, table, temp_workspace, write_json  # noqa: E402

from tqdm import tqdm  # noqa: E402

from mendctl.audit import record_audit, run_audit  # noqa: E402
from mendctl.editors.data import load_split  # noqa: E402
from mendctl.report import write_report  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402
from mendctl.edit import edit  # noqa: E402


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def run_chain(editor: str, cases, max_steps: int | None, report_dir: Path | None, config_editor: str | None,
              guard_norm: float | None = None, matrix: bool = True, protect: bool = True,
              settings: dict | None = None):
    root = temp_workspace(config_editor, {"guard_norm": guard_norm, "protect_edits": protect,
                                          **(settings or {})})
    ws = Workspace.open(str(root))
    policy = ws.policy(editor, 1, max_steps)  # the workspace's, as `mendctl edit` takes it
    max_steps = policy.max_steps
    t0 = time.time()
    for c in tqdm(cases, desc=f"{editor} T={len(cases)}", file=sys.stderr):
        # keep_failed: the chain's failures are what this measures
        edit(ws, [c], editor=editor, max_steps=max_steps, command=f"bench/sequential.py {editor}",
                keep_failed=True)
    edit_seconds = time.time() - t0
    entries = ws.ledger.entries(reverse=False)
    imm = [e.metrics_after or {} for e in entries]
    t1 = time.time()
    audit = run_audit(ws, matrix=matrix and report_dir is not None,
                      progress=lambda xs: tqdm(xs, desc="audit", file=sys.stderr))
    audit_seconds = time.time() - t1
    record_audit(ws, audit)
    if report_dir is not None:
        write_report(audit, report_dir)
    s = audit["summary"]
    row = {
        "editor": editor, "T": len(cases), "max_steps": max_steps,
        "guard_norm": guard_norm if editor == "mend" else None,
        "protect_edits": protect if editor == "mend" and not ws.config.routing else None,
        "editor_checkpoint": ws.editor(editor).info.get("created") if editor == "mend" else None,
        # a calibrated copy keeps its training's `created`: its α factor tells them apart
        "alpha_factor": ((ws.editor(editor).info.get("operating_point") or {})
                         .get("alpha_factor_total", 1.0)) if editor == "mend" else None,
        # routed edits (routing: true) take their own step and skip preserved keys and the
        # retention guard (as `edit.edit` makes them)
        "routing": ws.config.routing if editor == "mend" else None,
        "step_factor": policy.step_factor,
        "preserve_keys": policy.preserve_keys,
        "guard_clipped_edits": sum(1 for e in entries if (e.notes or {}).get("norm_scale") is not None),
        "immediate_edit_success": _mean([m.get("edit_success") for m in imm]),
        "immediate_paraphrase_success": _mean([m.get("paraphrase_success") for m in imm]),
        "immediate_locality_vs_previous": _mean([m.get("locality") for m in imm]),
        "final_edit_success": s["edit_retention"],
        "final_paraphrase_success": s["paraphrase_retention"],
        "final_locality_vs_base": s["edit_locality"],
        "final_audit_locality": s["audit_locality"],
        "final_ppl_drawdown": s["ppl_drawdown"],
        "final_relative_drift": s["relative_drift"],
        # chain health as `mendctl edit` showed it after each edit (agreement with the base on
        # the audit set) and the first edit that printed the warning
        "health_audit_locality": [((e.notes or {}).get("health") or {}).get("audit_locality")
                                  for e in entries],
        "first_health_warning": next((i + 1 for i, e in enumerate(entries)
                                      if ((e.notes or {}).get("health") or {}).get("below_threshold")),
                                     None),
        "seconds_per_edit": edit_seconds / len(cases),
        "audit_seconds": audit_seconds,
        "workspace": str(root),
    }
    if report_dir is not None and audit.get("chain"):
        row["series"] = audit["chain"]["series"]
    ws.ledger.close()
    return row


def _label(r: dict) -> str:
    if r["editor"] != "mend":
        return r["editor"]
    g = r.get("guard_norm")
    f, k = (r.get("alpha_factor") or 1.0) * (r.get("step_factor") or 1.0), r.get("max_steps", 1)
    steps = (f", α×{f:g}" if f != 1.0 else "") + (f", ≤{k} steps" if k > 1 else "") + \
        (f", preserved keys {r['preserve_keys']:g}" if r.get("preserve_keys") else "")
    if r.get("routing"):
        steps += f", routed τ {r['routing']['tau']:g}"
    return (f"mend ({r.get('editor_checkpoint') or 'editor'}{steps}, "
            f"{'no guard' if g is None else f'guard {g:g}'}"
            f"{', retention guard' if r.get('protect_edits') else ''})")


def _key(r: dict) -> tuple:
    return (r["editor"], r["T"], r.get("guard_norm"), r.get("editor_checkpoint"),
            r.get("alpha_factor") or 1.0, r.get("max_steps", 1), bool(r.get("protect_edits")),
            r.get("step_factor") or 1.0, r.get("preserve_keys"),
            json.dumps(r.get("routing"), sort_keys=True))


def plot(rows: list[dict], path: str) -> None:
    """Retention, audit-set locality and drift along the longest chain of each editor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in rows:
        if "series" not in r:
            continue
        s = [x for x in r["series"] if x["retention"] is not None]
        x = [p["active_edits"] for p in s]
        name = _label(r)
        axes[0].plot(x, [p["retention"] for p in s], label=f"{name}: mean retention")
        axes[0].plot(x, [p["audit_locality"] for p in s], "--", label=f"{name}: audit-set locality")
        axes[1].plot(x, [p["relative_drift"] for p in s], label=name)
    axes[0].set_xlabel("edits applied")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    axes[0].set_title("all active edits scored after each edit")
    axes[1].set_xlabel("edits applied")
    axes[1].set_ylabel("‖W − W_base‖ / ‖W_base‖")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1,10,100")
    ap.add_argument("--editors", default="mend,ft_kl")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="MEND steps per edit (1: the paper; default: the workspace's, max_steps)")
    ap.add_argument("--offset", type=int, default=0, help="first test case of every chain")
    ap.add_argument("--editor-dir", default=None, help="a MEND editor other than the shipped one")
    ap.add_argument("--out", default="bench/results/sequential.json")
    ap.add_argument("--plot", default="docs/sequential.png")
    ap.add_argument("--report", default=None, help="write the longest MEND chain's audit report here")
    ap.add_argument("--plot-only", action="store_true", help="redraw the table and plot from --out")
    ap.add_argument("--guard-norm", default="3", help="MEND drift guard (mendctl.yaml guard_norm), or off")
    ap.add_argument("--no-matrix", action="store_true",
                    help="skip the retention matrix of the longest chain (and its series in the plot)")
    ap.add_argument("--protect", choices=["on", "off"], default="on",
                    help="MEND retention guard (mendctl.yaml protect_edits)")
    add_settings_arg(ap)
    a = ap.parse_args()
    if a.plot_only:
        rows = json.loads(Path(a.out).read_text())["rows"]
        print_table(rows)
        plot(rows, a.plot)
        return
    lengths = [int(x) for x in a.lengths.split(",")]
    test = load_split("test")
    rows = []
    if Path(a.out).is_file():  # keep rows measured earlier (other editors), so runs can be split
        rows = json.loads(Path(a.out).read_text()).get("rows", [])
    for editor in a.editors.split(","):
        for T in lengths:
            longest = T == max(lengths)
            rep = Path(a.report) / editor if (a.report and longest) else None
            if longest and rep is None:
                rep = Path(tempfile.mkdtemp()) / "report"  # the series is still wanted for the plot
            guard = None if a.guard_norm == "off" else float(a.guard_norm)
            row = run_chain(editor, test[a.offset:a.offset + T], a.max_steps, rep, a.editor_dir,
                            guard, matrix=not a.no_matrix, protect=a.protect == "on",
                            settings=parse_settings(a.settings))
            rows = [r for r in rows if _key(r) != _key(row)] + [row]
            write_json(a.out, {"split": "test", "offset": a.offset, "rows": rows})
    print_table(rows)
    if a.plot:
        plot(rows, a.plot)
    print(json.dumps({"rows": len(rows)}))


def print_table(rows: list[dict]) -> None:
    for r in rows:
        r.setdefault("label", _label(r))
    cols = ["label", "T", "immediate_edit_success", "immediate_paraphrase_success",
            "immediate_locality_vs_previous", "final_edit_success", "final_paraphrase_success",
            "final_locality_vs_base", "final_audit_locality", "final_ppl_drawdown",
            "seconds_per_edit"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    print(table([{c: fmt(r[c]) for c in cols} for r in rows], cols))


if __name__ == "__main__":
    main()
