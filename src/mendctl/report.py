"""Audit reports: one directory with the audit as JSON, its figures as PNG, and the same
tables and figures as Markdown and as one self-contained HTML page (figures embedded).

This module only renders what `audit.run_audit` measured; every number in a report is read
from that result, so the report and `mendctl audit --json` cannot disagree.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

REPORT_JSON = "audit.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIG_RETENTION = "retention.png"
FIG_CHAIN = "chain.png"


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _figures(result: dict, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt
    import numpy as np

    chain = result.get("chain")
    if not chain or not chain["rows"]:
        return []
    figs = []
    m = np.array([[np.nan if v is None else v for v in row] for row in chain["matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * len(chain["columns"]), 14),
                                    min(1.5 + 0.3 * len(chain["rows"]), 12)))
    cmap = plt.get_cmap("RdYlGn").copy()
    cmap.set_bad("#dddddd")  # not yet made, reverted or squashed away
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0, vmax=1, aspect="auto",
                   interpolation="nearest")
    step = max(1, len(chain["columns"]) // 25)
    ax.set_xticks(range(0, len(chain["columns"]), step), [str(c) for c in chain["columns"]][::step])
    rstep = max(1, len(chain["rows"]) // 25)
    ax.set_yticks(range(0, len(chain["rows"]), rstep), [str(r) for r in chain["rows"]][::rstep])
    ax.set_xlabel("state after entry k")
    ax.set_ylabel("edit j")
    ax.set_title("retention: success of edit j in the state after entry k (grey: not active)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(out / FIG_RETENTION, dpi=110)
    plt.close(fig)
    figs.append((FIG_RETENTION, "Retention matrix"))

    s = chain["series"]
    x = [r["active_edits"] for r in s]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(x, [r["retention"] for r in s], "o-", label="mean retention of active edits")
    a1.plot(x, [r["audit_locality"] for r in s], "s-", label="audit-set locality vs base")
    a1.set_ylim(-0.02, 1.02)
    a1.set_xlabel("active edits in the state")
    a1.legend(fontsize=8)
    a2.plot(x, [r["relative_drift"] for r in s], "o-", color="tab:red")
    a2.set_xlabel("active edits in the state")
    a2.set_ylabel("‖W − W_base‖ / ‖W_base‖ (edited weights)")
    fig.tight_layout()
    fig.savefig(out / FIG_CHAIN, dpi=110)
    plt.close(fig)
    figs.append((FIG_CHAIN, "Locality, retention and drift along the chain"))
    return figs


def _tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    s = result["summary"]
    summary = [[k, _fmt(v, 4)] for k, v in s.items() if k != "state_hash"]
    edits = [[str(e["entry"]), "; ".join(f"{i} → {t}" for i, t in zip(e["inputs"], e["targets"])),
              _fmt(e["edit_success"]), _fmt(e["paraphrase_success"]), _fmt(e["locality"]),
              _fmt(e["locality_kl"]), _fmt(e["delta_norm"], 4)] for e in result["edits"]]
    drift = [[n, _fmt(d["frobenius"], 4), _fmt(d["relative"], 5)] for n, d in result["drift"].items()]
    flags = [[f["kind"], f["message"]] for f in result["flags"]] or [["–", "no flags"]]
    out = [("Summary", ["measure", "value"], summary),
           ("Active edits", ["entry", "edit", "ES", "paraphrase", "locality", "KL", "‖ΔW‖_F"], edits),
           ("Drift per weight", ["weight", "‖W − W_base‖_F", "relative"], drift),
           ("Flags", ["kind", "message"], flags)]
    ud = result.get("ud_statistics")
    if ud:
        rows = [[n, _fmt(ud["base"][n]["u_mean_shift"]), _fmt(ud["state"][n]["u_mean_shift"]),
                 _fmt(ud["base"][n]["delta_mean_shift"]), _fmt(ud["state"][n]["delta_mean_shift"])]
                for n in ud["state"]]
        out.append(("u/δ statistics vs the editor's normalisation (mean |μ − μ_norm| / σ_norm)",
                    ["weight", "u base", "u state", "δ base", "δ state"], rows))
    return out


def write_report(result: dict, out_dir: str | Path) -> dict:
    """Write the report files; returns {"dir", "files"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    figs = _figures(result, out)
    tables = _tables(result)
    s = result["summary"]
    title = f"mendctl audit of state {s['state']} ({result['model']})"
    cost = (result.get("chain") or {}).get("cost")

    md = [f"# {title}", "", f"state hash `{s['state_hash']}`, audit set {result['audit_set']['source']} "
          f"({result['audit_set']['prompts']} prompts, {result['audit_set']['passages']} passages)", ""]
    for name, head, rows in tables:
        md += [f"## {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        md.append("")
    for f, caption in figs:
        md += [f"## {caption}", "", f"![{caption}]({f})", ""]
    if cost:
        md += ["## Cost of the retention matrix", "", "```", json.dumps(cost, indent=1), "```", ""]
    (out / REPORT_MD).write_text("\n".join(md))

    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
         "table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;"
         "padding:3px 8px;text-align:left}th{background:#f3f3f3}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>",
         f"<p>state hash <code>{s['state_hash']}</code>; audit set "
         f"{html.escape(result['audit_set']['source'])}</p>"]
    for name, head, rows in tables:
        h.append(f"<h2>{html.escape(name)}</h2><table><tr>"
                 + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
        h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
        h.append("</table>")
    for f, caption in figs:
        data = base64.b64encode((out / f).read_bytes()).decode()
        h.append(f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' "
                 f"src='data:image/png;base64,{data}'>")
    if cost:
        h.append(f"<h2>Cost of the retention matrix</h2><pre>{html.escape(json.dumps(cost, indent=1))}</pre>")
    h.append("</body></html>")
    (out / REPORT_HTML).write_text("\n".join(h))
    files = [REPORT_JSON, REPORT_MD, REPORT_HTML] + [f for f, _ in figs]
    return {"dir": str(out), "files": files}
