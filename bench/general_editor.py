"""Does the editor generalise beyond what it was trained on? Single edits at the default
settings (routed), each a fresh edit of the base model, scored as `mendctl eval` scores them,
for one or more editors on three sets:

- heldout: the bundled split of relations (and a whole subject kind) never trained on;
- test: the bundled test split (unseen subjects, held-out wordings);
- real: bench/data/zsre_real.json, real-world edits written by hand in zsRE format (people,
  organisations, offices, works, science; questions as users type them), never trained or
  tuned on.

Prints one table (reliability = edit success, generalisation = paraphrase success, locality,
fluency beside the unedited model's, token accuracies, seconds per edit) and writes JSON.

Usage: python bench/general_editor.py [--editor default --editor DIR ...] [--cases 60]
           [--sets heldout,test,real] [--out bench/results/general_editor.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, temp_workspace, write_json  # noqa: E402

from tqdm import tqdm  # noqa: E402

from mendctl.editors.data import load_split, read_cases  # noqa: E402
from mendctl.evaluate import evaluate  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402

REAL = Path(__file__).parent / "data" / "zsre_real.json"
ALIASES = Path(__file__).parent / "data" / "aliases_real.json"
KEYS = ["edit_success", "paraphrase_success", "locality", "locality_neighbour", "locality_other",
        "locality_same_subject", "fluency", "fluency_base", "edit_token_accuracy",
        "paraphrase_token_accuracy", "seconds_per_edit"]


def cases_of(name: str, n: int):
    """The first `n` cases of a bundled split, of the real-world edits (`real`), or of the
    real-world edits whose paraphrases name their country another way (`aliases`)."""
    if name in ("real", "aliases"):
        return with_neighbours(read_cases(REAL if name == "real" else ALIASES))[:n]
    return load_split(name)[:n]


def with_neighbours(cases):
    """The real-world cases, each with a neighbour locality prompt besides its unrelated
    question: its own input about the next case of the same kind whose subject it names
    ("Who is the president of France?" → "... of Russia?"), which an edit must leave alone.
    Locality kinds as the bundled data labels them: `neighbour`, and `other` for the file's
    unrelated question."""
    out = []
    for i, c in enumerate(cases):
        subject, kind = c.meta.get("subject"), c.meta.get("kind")
        loc, kinds = list(c.locality), ["other"] * len(c.locality)
        if subject and subject in c.input:
            others = [x for x in cases[i + 1:] + cases[:i]
                      if x.meta.get("kind") == kind and x.meta.get("subject") not in (None, subject)]
            if others:
                loc.append(c.input.replace(subject, others[0].meta["subject"]))
                kinds.append("neighbour")
        out.append(dataclasses.replace(c, locality=loc, meta={**c.meta, "locality_kinds": kinds}))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--editor", action="append", default=None,
                    help="editor directory, or `default` (the shipped one); repeatable")
    ap.add_argument("--cases", type=int, default=60, help="first N cases of each set")
    ap.add_argument("--sets", default="heldout,test,real")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/general_editor.json")
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    editors = a.editor or ["default"]
    out = {"cases": a.cases, "runs": []}
    rows = []
    for ed in editors:
        ws = Workspace.open(str(temp_workspace(None if ed == "default" else ed)))
        for name in a.sets.split(","):
            cases = cases_of(name, a.cases)
            # (no perplexity: generic text names no edited subject, so a routed edit never acts
            # on it; `mendctl eval` measures it)
            r = evaluate(ws, cases, ppl_passages=0,
                         progress=lambda xs, d=f"{ed} {name}": tqdm(xs, desc=d, file=sys.stderr))
            s = r["summary"]
            out["runs"].append({"editor": ed, "set": name, "summary": s, "relations": r["relations"],
                                "answers": [(c["input"], c["target"], c["answer"]) for c in r["cases"]]})
            rows.append({"editor": ed, "set": f"{name} ({s['cases']})",
                         **{k: "-" if s.get(k) is None else f"{s[k]:.3f}" for k in KEYS}})
        ws.ledger.close()
    print(table(rows, ["editor", "set"] + KEYS))
    write_json(a.out, out)


if __name__ == "__main__":
    main()
