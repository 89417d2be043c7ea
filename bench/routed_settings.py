"""One routing setting swept: single routed edits at each value, scored as `mendctl eval`
scores them (each a fresh edit of the base model, the shipped editor), with the stored bytes as
a share of the dense weights the edit touches.

- `--key rank_cut` (storage): each fact's ΔW truncated, after every step, to the directions
  whose singular values exceed the cut × the largest (none: every direction kept);
- `--key confidence` (generalisation): an edit steps until every target token is the argmax
  with at least this probability (none: until it is the argmax);
- `--key contexts` (generalisation): the prefixes under which an edit's first step also
  learns the fact (`none`: the prompt alone; `default`: the shipped list; values are
  separated by `;` when any of them holds a comma, and are read as YAML: `["A. ", "B "]`);
- `--key all_keys` (precision): whether a subject gate opens by states only once every one of
  its keys has been matched (true) or on one of them (false);
- `--key aliases` (recall): whether a subject gate also opens on the other names of what it
  reads (a country's demonym and other names); `--sets aliases` is bench/data/aliases_real.json,
  whose paraphrases use them.

Usage: python bench/routed_settings.py --key contexts --values 'none;default'
       python bench/routed_settings.py --key confidence [--values none,0.6,0.75,0.9]
           [--cases 30] [--sets test,real,heldout] [--out bench/results/routed_confidence.json]
       python bench/routed_settings.py --key rank_cut --values none,0.01,0.05 --sets test,real
           --out bench/results/routed_storage.json
"""
from __future__ import annotations

import argparse
import sys

import yaml
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, temp_workspace, write_json  # noqa: E402
from general_editor import cases_of  # noqa: E402

from tqdm import tqdm  # noqa: E402

from mendctl.config import ROUTING_DEFAULTS  # noqa: E402
from mendctl.evaluate import evaluate  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402

KEYS = ["edit_success", "paraphrase_success", "locality", "locality_same_subject",
        "locality_unnamed", "paraphrase_token_accuracy", "fluency", "repeats_target",
        "gate_recall", "stored_share", "seconds_per_edit"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--key", required=True, choices=sorted(ROUTING_DEFAULTS))
    ap.add_argument("--values", default="none,0.6,0.75,0.9",
                    help="separated by `,` (or `;`); each read as YAML; none: null; default: "
                         "the shipped value")
    ap.add_argument("--cases", type=int, default=30, help="first N cases of each set")
    ap.add_argument("--sets", default="test,real,heldout")
    ap.add_argument("--out", default=None, help="default bench/results/routed_<key>.json")
    a = ap.parse_args()
    out, rows = {"key": a.key, "cases": a.cases, "runs": []}, []
    for text in a.values.split(";" if ";" in a.values else ","):
        value = (None if text == "none" else ROUTING_DEFAULTS[a.key] if text == "default"
                 else yaml.safe_load(text))
        ws = Workspace.open(str(temp_workspace(settings={"routing": {a.key: value}})))
        try:
            for name in a.sets.split(","):
                r = evaluate(ws, cases_of(name, a.cases), ppl_passages=0,
                             progress=lambda xs, d=f"{a.key} {text} {name}": tqdm(xs, desc=d, file=sys.stderr))
                s = r["summary"]
                out["runs"].append({a.key: value, "set": name, "summary": s,
                                    "cases": [{k: c.get(k) for k in ("input", "target", "edit_success",
                                                                      "paraphrase_success", "locality")}
                                              for c in r["cases"]]})
                rows.append({a.key: text, "set": f"{name} ({s['cases']})",
                             **{k: "-" if s.get(k) is None else f"{s[k]:.3f}" for k in KEYS}})
        finally:
            ws.ledger.close()
    print(table(rows, [a.key, "set"] + KEYS))
    write_json(a.out or f"bench/results/routed_{a.key}.json", out)


if __name__ == "__main__":
    main()
