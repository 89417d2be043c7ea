"""`mendctl edit --each FILE.jsonl`: sequential edits as one command, each fact its own ledger
entry, resumable (facts already applied on the chain are skipped)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import CHAIN, Ws, fresh_ws, one_line_error, tiny_assets  # noqa: E402,F401


def _write(path: Path, facts) -> Path:
    path.write_text("".join(json.dumps({"input": x, "target": y}) + "\n" for x, y in facts))
    return path


def test_each_fact_is_its_own_entry_and_a_rerun_skips_what_is_applied(fresh_ws: Ws):
    ws = fresh_ws
    facts = _write(ws.root / "facts.jsonl", CHAIN)
    r = ws.ok("edit", "--each", facts, "--max-steps", "1", "--json").json()
    # (the tiny workspace records edits that did not take: `failed-kept`)
    assert {x["status"] for x in r["facts"]} <= {"recorded", "failed-kept"}
    assert [x["entry"] for x in r["facts"]] == [1, 2, 3]
    log = sorted(ws.ok("log", "--json").json(), key=lambda e: e["id"])
    assert [(e["inputs"], e["targets"]) for e in log] == [([x], [y]) for x, y in CHAIN]
    assert log[-1]["active_ids"] == [1, 2, 3]

    more = _write(ws.root / "more.jsonl", CHAIN + [("The sun rises in the", "west")])
    human = ws.ok("edit", "--each", more, "--max-steps", "1")
    assert "3 already applied (skipped), 0 did not take" in human.stdout
    assert human.stdout.count("skipped ") == 3 and "entry 4" in human.stdout
    assert ws.ledger_count() == 4
    r = ws.ok("edit", "--each", more, "--json").json()
    assert r["counts"]["skipped"] == 4 and ws.ledger_count() == 4


def test_each_refuses_a_bad_file_whole_and_reports_edits_that_did_not_take(fresh_ws: Ws):
    ws = fresh_ws
    bad = ws.root / "bad.jsonl"
    bad.write_text(json.dumps({"input": CHAIN[0][0], "target": "Rome"}) + "\n{oops\n")
    assert "bad.jsonl:2:" in one_line_error(ws.run("edit", "--each", bad))
    assert ws.ledger_count() == 0
    msg = one_line_error(ws.run("edit", "--each", bad, "--batch", bad))
    assert "--each and --batch" in msg

    ws.write_config(keep_failed=False)
    facts = _write(ws.root / "facts.jsonl", CHAIN)
    r = ws.run("edit", "--each", facts, "--max-steps", "1", "--json")
    out = json.loads(r.stdout)
    failed = [x for x in out["facts"] if x["status"] == "failed"]
    recorded = [x for x in out["facts"] if x["status"] == "recorded"]
    assert len(failed) + len(recorded) == 3
    assert ws.ledger_count() == len(recorded)
    assert r.returncode == (3 if failed else 0)
    assert all("did not take" in x["error"] for x in failed)


def test_eval_chain_runs_the_sequential_protocol_in_a_scratch_workspace(fresh_ws: Ws):
    ws = fresh_ws
    data = ws.root / "cases.jsonl"
    subjects = ["France", "Eiffel Tower", "Water"]  # (the third's locality prompt names it)
    kinds = [["other"], ["other"], ["same_subject"]]  # (labels as the bundled data has them)
    data.write_text("".join(json.dumps({"input": x, "target": y, "paraphrases": [x + " Answer:"],
                                        "locality": ["Water is made of"], "subject": sub,
                                        "locality_kinds": kind}) + "\n"
                            for (x, y), sub, kind in zip(CHAIN, subjects, kinds)))
    r = ws.ok("eval", "--data", data, "--chain", "3", "--max-steps", "1", "--json").json()
    s = r["summary"]
    # final locality by kind of prompt: each kind's mean, together the overall mean
    fi = s["final"]
    assert fi["locality"] == pytest.approx((2 * fi["locality_other"] + fi["locality_same_subject"]) / 3,
                                           rel=1e-12)
    # no locality prompt names none of the edited subjects: nothing to score there
    assert s["final"]["locality_unnamed"] is None
    assert s["chain"] == 3 and len(r["cases"]) == 3 and s["routed"] is False
    for part in ("immediate", "final"):
        assert all(0.0 <= s[part][k] <= 1.0 for k in ("edit_success", "paraphrase_success", "locality"))
    assert s["final"]["fluency"] >= 0 and s["final"]["locality_kl"] >= 0
    # each entry's stored bytes as a share of its dense ΔW: the summary is the cases' mean and max
    shares = [c["stored_share"] for c in r["cases"]]
    assert all(x > 0 for x in shares) and s["stored_share_max"] == max(shares)
    assert s["stored_share"] == pytest.approx(sum(shares) / 3, rel=1e-12)
    assert ws.ledger_count() == 0 and ws.delta_files() == []  # the user's ledger is untouched
    human = ws.ok("eval", "--data", data, "--chain", "2", "--max-steps", "1")
    assert "chain of 2 edits" in human.stdout and "immediate" in human.stdout
    assert "stored delta per entry" in human.stdout and "by kind of prompt: other" in human.stdout
    # --keep: the chain's workspace stays, its final state the chain's
    kept = ws.root.parent / "kept-chain"
    human = ws.ok("eval", "--data", data, "--chain", "2", "--max-steps", "1", "--keep", kept)
    assert f"kept the chain's workspace in {kept}" in human.stdout
    log = ws.ok("-w", kept, "log").stdout
    assert CHAIN[0][0] in log and CHAIN[1][0] in log
    for args, msg in ((("--keep", kept), "already exists"), (("--keep", ws.root.parent / "k2"), "add --chain")):
        chain = ("--chain", "2") if msg == "already exists" else ()
        r = ws.run("eval", "--data", data, *chain, "--max-steps", "1", *args)
        assert r.returncode == 1 and msg in one_line_error(r)
    assert not (ws.root.parent / "k2").exists()
