"""Draw editors' trade-off curves from the sweeps `mendctl calibrate` records in editor.json
(`operating_point.sweep`): validation edit success, paraphrase success and locality against
the factor on α, and edit success against locality. Prints the sweeps as a table.

Usage: python bench/plot_operating_point.py LABEL=DIR/editor.json [LABEL=...] [--out docs/operating_point.png]
       [--json bench/results/operating_point.json]
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_json  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("editors", nargs="+", help="LABEL=path/to/editor.json")
ap.add_argument("--out", default="docs/operating_point.png")
ap.add_argument("--json", default="bench/results/operating_point.json")
a = ap.parse_args()

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
rows = []
sweeps = {}
for spec in a.editors:
    label, path = spec.split("=", 1)
    op = json.loads(Path(path).read_text())["operating_point"]
    sweep = op["sweep"]
    sweeps[label] = {"editor_json": path, **op}
    # factors relative to the editor as trained (a checkpoint rescaled before shows its
    # sweep around the α it had then)
    x = [r["scale"] for r in sweep]
    line, = left.plot(x, [r["edit_success"] for r in sweep], marker="o", label=f"{label}: edit success")
    left.plot(x, [r["locality"] for r in sweep], marker="s", ls="--", color=line.get_color(),
              label=f"{label}: locality")
    left.plot(x, [r["paraphrase_success"] for r in sweep], marker="^", ls=":", color=line.get_color(),
              label=f"{label}: paraphrase")
    right.plot([r["locality"] for r in sweep], [r["edit_success"] for r in sweep], marker="o",
               color=line.get_color(), label=label)
    c = op["chosen"]
    right.scatter([c["locality"]], [c["edit_success"]], s=120, facecolors="none",
                  edgecolors=line.get_color())
    for r in sweep:
        rows.append({"editor": label, "α ×": r["scale"], "edit success": f"{r['edit_success']:.3f}",
                     "paraphrase": f"{r['paraphrase_success']:.3f}", "locality": f"{r['locality']:.3f}",
                     "chosen": "*" if r["scale"] == op["alpha_factor"] else ""})
    target = op["locality_target"]
right.axvline(target, color="grey", ls=":")
right.axhline(0.9, color="grey", ls=":")
left.set_xlabel("factor on the editor's steps α")
left.set_title(f"validation ({op['cases']} cases), single edits", fontsize=10)
left.legend(fontsize=7)
right.set_xlabel("locality")
right.set_ylabel("edit success")
right.set_title("trade-off (circle: chosen; dotted: targets)", fontsize=10)
right.legend(fontsize=8)
fig.tight_layout()
fig.savefig(a.out, dpi=120)
print(table(rows, ["editor", "α ×", "edit success", "paraphrase", "locality", "chosen"]))
print(f"wrote {a.out}", file=sys.stderr)
write_json(a.json, sweeps)
