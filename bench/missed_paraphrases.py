"""What a paraphrase that misses its routed edit is answered: the target, the unedited model's
answer, or neither (a half-fired edit: "Matteoessorsi" for "Matteo Salvini").

Single routed edits, as `mendctl eval` makes and scores them (the shipped editor, the
default settings, each a fresh edit of the base model); for every paraphrase of each case the
greedy answer (24 tokens) before and after the edit. A paraphrase whose answer writes the
target counts as taken; one whose answer's first three words are the unedited answer's kept
the base; any other is neither. Prints a table and writes JSON with every missed answer.

With `--locality`, each case's locality prompts are answered too, by kind where the data
labels them (the same subject's other facts, neighbours, other relations; the real-world
set's unrelated question is `other`): how many answers write the edit's target where the
unedited answer did not (the edit leaked into them), start as the unedited answer, or
neither: the locality of generated
answers, beside the teacher-forced token agreement `mendctl eval` reports.

    python bench/missed_paraphrases.py [--sets real,test] [--cases 30] [--locality]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, temp_workspace, write_json  # noqa: E402
from general_editor import cases_of  # noqa: E402

import mendctl.evaluate as evaluation  # noqa: E402
from mendctl.workspace import Workspace  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="real,test")
    ap.add_argument("--cases", type=int, default=30, help="first N cases of each set")
    ap.add_argument("--locality", action="store_true",
                    help="also answer each case's locality prompts (by kind)")
    ap.add_argument("--out", default=None,
                    help="default bench/results/missed_paraphrases.json (with --locality: "
                         "generated_locality.json)")
    a = ap.parse_args()
    # `evaluate` generates each case's answer before and after its edit with `fluency_answers`;
    # wrapped here to answer the case's paraphrases in the same calls (same state, same batch)
    paraphrases: dict[str, list[str]] = {}
    calls: list[tuple[list[str], list[str]]] = []
    generate = evaluation.fluency_answers

    def with_paraphrases(model, tok, prompts, fmt):
        asked = list(prompts) + [p for x in prompts for p in paraphrases.get(x, [])]
        answers = generate(model, tok, asked, fmt)
        calls.append((asked, answers))
        return answers[:len(prompts)]

    evaluation.fluency_answers = with_paraphrases
    ws = Workspace.open(str(temp_workspace()))
    rows, out = [], {"cases": a.cases, "sets": {}}
    try:
        for name in a.sets.split(","):
            cases = cases_of(name, a.cases)
            paraphrases.update({c.input: list(c.paraphrases) + (list(c.locality) if a.locality else [])
                                for c in cases})
            calls.clear()
            evaluation.evaluate(ws, cases, ppl_passages=0)  # one case per batch: two calls each
            if len(calls) != 2 * len(cases):  # the pairing below would misattribute answers
                raise SystemExit(f"evaluate answered {len(calls)} times for {len(cases)} cases, "
                                 "not twice per case (before and after): update this script")
            answered = []
            for i, c in enumerate(cases):
                (asked, before), (_, after) = calls[2 * i], calls[2 * i + 1]
                kinds = ["paraphrase"] * len(c.paraphrases) + (list(c.meta.get("locality_kinds") or [])
                                                               or ["other"] * len(c.locality))
                for p, b, x, what in zip(asked[1:], before[1:], after[1:], kinds):
                    # (an answer that wrote the target unedited, "Physics" for another Nobel
                    # laureate, did not take it from the edit)
                    took = c.target.strip().lower() in x.lower() and (
                        what == "paraphrase" or c.target.strip().lower() not in b.lower())
                    kind = ("target" if took
                            else "base" if x.split()[:3] == b.split()[:3] else "neither")
                    answered.append({"prompt": p, "kind": what, "target": c.target, "before": b,
                                     "after": x, "answer": kind})
            out["sets"][name] = {}
            for what in dict.fromkeys(r["kind"] for r in answered):
                these = [r for r in answered if r["kind"] == what]
                count = {k: sum(r["answer"] == k for r in these) for k in ("target", "base", "neither")}
                # (a paraphrase misses where it does not take the target; a locality prompt
                # where it does not keep the unedited answer)
                keep = "target" if what == "paraphrase" else "base"
                out["sets"][name][what] = {"prompts": len(these), **count,
                                           "missed": [r for r in these if r["answer"] != keep]}
                rows.append({"set": name, "prompts": f"{what} ({len(these)})",
                             **{k: str(v) for k, v in count.items()}})
    finally:
        evaluation.fluency_answers = generate
        ws.ledger.close()
    print(table(rows, ["set", "prompts", "target", "base", "neither"]))
    write_json(a.out or ("bench/results/generated_locality.json" if a.locality
                         else "bench/results/missed_paraphrases.json"), out)


if __name__ == "__main__":
    main()
