"""Where a routed chain's gates open: on the final state of a chain kept with `mendctl eval
--chain T --keep DIR`, at the last token of each prompt (where its answer is predicted):
- gate recall: does each fact's own gate open on its prompt and its paraphrases, and is it
  the one chosen among its subject's (`select`)?
- leaks: which locality prompts naming no edited subject open some gate, which gate, and
  whether by its words or by its state keys (a look-alike name).

Usage: python bench/gate_leaks.py --workspace DIR [--data FILE] [--out bench/results/gate_leaks.json]
(--data: the chain's data file, zsRE/CounterFact/JSONL; default the bundled test split, whose
first T cases `eval --chain T` edits)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_json  # noqa: E402

import torch  # noqa: E402

from mendctl.editors.data import load_split, read_cases  # noqa: E402
from mendctl.editors.route import WordIndex, open_at_end  # noqa: E402
from mendctl.editors.text import render_prompt  # noqa: E402
from mendctl.evaluate import subject_pattern  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", required=True, help="a chain kept with `eval --chain T --keep DIR`")
    ap.add_argument("--data", help="the chain's data file (default: the bundled test split)")
    ap.add_argument("--out", default="bench/results/gate_leaks.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ws = Workspace.open(a.workspace)
    try:
        out = report(ws, a.data)
    finally:
        ws.ledger.close()
    write_json(a.out, out)


def report(ws, data: str | None) -> dict:
    _, entries = ws.split(list(ws.head().active_ids))
    edits = ws.router.edits(entries)
    settings = {(s["layer"], s["tau"], s.get("margin")) for _, s in edits}
    if len(settings) != 1:
        raise SystemExit(f"the chain's entries were routed with several settings {settings}")
    layer, tau, margin = settings.pop()
    if data:
        cases = read_cases(data)[: len(entries)]
    else:
        cases = load_split("test")[: len(entries)]
    if [c.input for c in cases] != [e.inputs[0] for e in entries]:
        raise SystemExit("the workspace's entries are not the data's first cases in order: "
                         "give the --data the chain was made from")
    lm, space = ws.lm, ws.router.space(layer)
    gates = [r.gate for r, _ in edits]
    args = (lm.model, lm.tokenizer, space, gates)

    def own(prompts, owners, select):
        got = open_at_end(*args, prompts, tau, ws.fmt, margin, select)
        return got[torch.arange(len(prompts)), torch.tensor(owners)].float().mean().item()

    inputs = [c.input for c in cases]
    para = [(i, p) for i, c in enumerate(cases) for p in c.paraphrases]
    recall = {
        "inputs_open": own(inputs, list(range(len(cases))), False),
        "inputs_chosen": own(inputs, list(range(len(cases))), True),
        "paraphrases_open": own([p for _, p in para], [i for i, _ in para], False),
        "paraphrases_chosen": own([p for _, p in para], [i for i, _ in para], True),
    }
    named = subject_pattern(cases)
    loc = sorted({p for c in cases for p in c.locality if named is None or not named.search(p)})
    opened = open_at_end(*args, loc, tau, ws.fmt, margin, False)
    index = WordIndex.of_gates(gates)
    leaks = []
    for k in opened.any(1).nonzero().flatten().tolist():
        by_words = index.opened(render_prompt(lm.tokenizer, loc[k], ws.fmt) + " ")
        leaks.append({"prompt": loc[k], "gates": [
            {"entry": entries[g].id, "names": list(gates[g].words), "state_keys": len(gates[g].keys),
             "by": "words" if g in by_words else "states"}
            for g in opened[k].nonzero().flatten().tolist()]})
    out = {"workspace": str(ws.root), "chain": len(entries), "min_keys": sorted(
        {s.get("min_keys", 0) for _, s in edits}), "gate_recall": recall,
        "unnamed_prompts": len(loc), "unnamed_prompts_opening_a_gate": len(leaks), "leaks": leaks}
    print(table([{"measure": k.replace("_", " "), "share": f"{v:.3f}"} for k, v in recall.items()],
                ["measure", "share"]))
    print(f"\n{len(leaks)} of {len(loc)} locality prompts naming no edited subject open a gate:")
    for x in leaks:
        print(f"  {x['prompt'][:60]!r} → " + "; ".join(
            f"{' '.join(g['names'])} ({g['state_keys']} keys, by {g['by']})" for g in x["gates"]))
    return out


if __name__ == "__main__":
    main()
