"""Draw an editor's validation history (from its editor.json) against training steps.

Usage: python bench/plot_training.py [src/mendctl/editors/checkpoints/smollm2-135m/editor.json] [docs/training.png]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "src/mendctl/editors/checkpoints/smollm2-135m/editor.json"
out = sys.argv[2] if len(sys.argv) > 2 else "docs/training.png"
doc = json.load(open(src))
hist = doc["training"]["history"]
steps = [h["step"] for h in hist]
fig, ax = plt.subplots(figsize=(7, 3.4))
gated = doc["training"]["config"].get("gated")
for key, label in [("edit_success", "edit success"), ("paraphrase_success", "paraphrase success"),
                   ("locality", "locality (other prompts naming the subject)" if gated else "locality")]:
    ax.plot(steps, [h[key] for h in hist], marker="o", label=label)
ax.axvline(doc["training"]["best_step"], color="grey", ls=":", label="kept checkpoint")
ax.set_xlabel("training step (4 edits per step)")
ax.set_ylim(0.0, 1.0)
ax.set_title(f"MEND editor for SmolLM2-135M: validation ({doc['training']['config']['val_cases']} val cases"
             + (", routed edits, one step)" if gated else ")"))
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(out, dpi=120)
print(f"wrote {out}")
