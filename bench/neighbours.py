"""Where a chain's locality goes: after a chain of L test-split edits (shipped editor at its
operating point, drift guard 3, optionally the retention guard), the greedy answers of every
edit's locality prompts (neighbours: other subjects, same relations) before and after, and how
many of the changed answers now name one of the chain's own targets. A high share means the
edits generalised along the relation ("X is a city in" → the edited country) rather than
damaging the model at random.

Usage: python bench/neighbours.py [--length 10] [--offset 0] [--max-steps 5] [--protect]
       [--out bench/results/neighbours.json]
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_json  # noqa: E402

from mendctl.editors.data import load_split  # noqa: E402
from mendctl.editors.mend.editor import MendEditor, _stack  # noqa: E402
from mendctl.editors.metrics import generate  # noqa: E402
from mendctl.editors.weights import applied, select_weights  # noqa: E402
from mendctl.models import load_model  # noqa: E402
from mendctl.workspace import shipped_editor_dir  # noqa: E402


def first_word(text: str) -> str:
    words = text.split()
    return words[0].strip(".,;:") if words else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--protect", action="store_true", help="the retention guard on")
    ap.add_argument("--out", default="bench/results/neighbours.json")
    a = ap.parse_args()
    lm = load_model("smollm2-135m")
    specs = select_weights(lm.model, ["auto"])
    ed = MendEditor.load(shipped_editor_dir("smollm2-135m"), specs, lm.base_hash)
    guard = 3 * ed.info["delta_norm_reference"]["median"]
    chain = load_split("test")[a.offset:a.offset + a.length]
    prompts = [p for c in chain for p in c.locality]
    before = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=4)
    delta, done = None, []
    for c in chain:
        with applied(lm.model, delta) if delta is not None else nullcontext():
            step = ed.edit(lm.model, lm.tokenizer, [c.input], [c.target], max_steps=a.max_steps,
                           max_norm=guard, protect=done if a.protect else None)
        done.append((c.input, c.target))
        delta = step if delta is None else _stack(delta, step)
    with applied(lm.model, delta):
        after = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=4)
    targets = {first_word(c.target) for c in chain}
    rows = [{"prompt": p, "before": b, "after": x, "changed": first_word(b) != first_word(x),
             "names_a_chain_target": first_word(x) in targets}
            for p, b, x in zip(prompts, before, after)]
    changed = [r for r in rows if r["changed"]]
    summary = {"chain_length": len(chain), "max_steps": a.max_steps, "protect": a.protect,
               "relations": sorted({c.meta.get("relation", "?") for c in chain}),
               "neighbour_prompts": len(rows), "changed": len(changed),
               "changed_to_a_chain_target": sum(r["names_a_chain_target"] for r in changed)}
    print(table([{k: str(v) for k, v in summary.items()}], list(summary)))
    print(table([{k: repr(r[k]) for k in ("prompt", "before", "after")} for r in changed[:15]],
                ["prompt", "before", "after"]))
    write_json(a.out, {"split": "test", "offset": a.offset, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
