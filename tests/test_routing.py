"""Routed edits in a workspace (`routing` in mendctl.yaml; mendctl/routing.py).

In-process on the tiny Llama and untrained editor of tests/e2e_helpers.py (gate layer 1: its
edited weights are blocks 1-3), one CLI flow (in this process, and in real subprocesses in the
full suite), and a slow test on the embedded
default model with the shipped editor: routed edits land, hold side by side, and leave
answers on prompts that name neither subject exactly as the base model gives them.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import fresh_ws, one_line_error, tiny_assets  # noqa: E402,F401

from mendctl import config as config_mod  # noqa: E402
from mendctl.editors import route  # noqa: E402
from mendctl.editors.data import EditCase  # noqa: E402
from mendctl.editors.metrics import edit_success, generate  # noqa: E402
from mendctl.editors.text import encode_prompts  # noqa: E402
from mendctl.errors import InputError  # noqa: E402
from mendctl.export import export  # noqa: E402
from mendctl.replay import verify_chain  # noqa: E402
from mendctl.revert import revert  # noqa: E402
from mendctl.edit import edit  # noqa: E402

ROUTING = {"layer": 1}  # the tiny model edits blocks 1-3; the gate sits below them
FACTS = [("The capital of France is", "Rome"), ("Who is India's PM?", "Angela Merkel")]


@pytest.fixture
def routed_ws(fresh_ws):
    from mendctl.workspace import Workspace

    fresh_ws.write_config(routing=ROUTING, health_check=False)
    w = Workspace.open(str(fresh_ws.root))
    try:
        yield fresh_ws, w
    finally:
        w.ledger.close()


def _edit(w, prompt, target, **kw):
    return edit(w, [EditCase(input=prompt, target=target)], **kw)


def _entry_gate(w, prompt, target):
    """Edit `prompt` → `target`; (its entry's recorded routing settings, its gate as loaded)."""
    from mendctl import routing

    e = w.ledger.get(_edit(w, prompt, target)["entry"])
    s = routing.of(e)
    return s, w.router.gate(e.inputs[0], s, e.targets[0])


def _same_delta(got, want):
    """The two deltas' ΔW agree to float32 rounding of the larger's entries (one side may hold
    a delta and its negation, which cancel to rounding)."""
    for name, layer in want.layers.items():
        a, b = got.layers[name].to_dense().double(), layer.to_dense().double()
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def _logits(w, prompts):
    b = encode_prompts(w.lm.tokenizer, prompts, w.fmt)
    with torch.no_grad():
        return w.lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


def test_config_routing_defaults_are_the_chosen_gate_settings():
    s = config_mod.parse({"routing": True}, "x").routing
    assert (s["layer"], s["distinct"], s["tau"]) == (route.GATE_LAYER, route.DISTINCT, route.TAU)
    assert config_mod.parse({}, "x").routing == s
    # routed edits are the default engine; `routing: false` makes plain weight edits
    assert config_mod.parse(yaml.safe_load(config_mod.TEMPLATE), "t").routing == s
    assert config_mod.parse({"routing": False}, "x").routing is None
    assert config_mod.parse({"routing": {"tau": 0.8}}, "x").routing["tau"] == 0.8
    for bad, word in (({"tau": 1.5}, "tau"), ({"gate": 1}, "unknown"), ("yes", "routing")):
        with pytest.raises(config_mod.ConfigError, match=word):
            config_mod.parse({"routing": bad}, "x")


def test_routed_edits_are_hooks_recorded_with_their_gate(routed_ws):
    ws, w = routed_ws
    base = {n: t.clone() for n, t in w.weights_for([]).items()}
    base_logits = _logits(w, [p for p, _ in FACTS])
    reports = [_edit(w, p, t) for p, t in FACTS]
    head = w.head()
    assert head.active_ids == [1, 2] and w.routed_ids(head.active_ids) == [1, 2]
    for r, e in zip(reports, [w.ledger.get(1), w.ledger.get(2)]):
        rt = e.record.routing
        # (a subject the bank knows opens its gate by its words alone: no state key)
        assert rt["layer"] == 1 and rt["tau"] == route.TAU and rt["gate_keys"] + len(rt["gate_words"]) >= 1
        assert rt["gate_sha256"] == r["routing"]["gate_sha256"]
        assert r["protect"]["on"] is False and r["preserve"]["cut"] is None
    # the weights are the base's; the state's hash is not (it covers the routed deltas)
    w_head = w.weights_for(head.active_ids, head.state_hash)
    assert all(torch.equal(w_head[n], base[n]) for n in base)
    assert head.state_hash != w.ledger.get(1).state_hash != w._base_hash
    # loaded, the head acts as the routed deltas on the base model, through the hooks
    w._loaded_state = None
    w.use_state(head)
    assert w.router.active
    got = _logits(w, [p for p, _ in FACTS])
    w.use_state(None)
    assert not w.router.active
    assert torch.equal(_logits(w, [p for p, _ in FACTS]), base_logits)
    space = w.router.space(1)
    from mendctl.routing import of

    entries = [w.ledger.get(i) for i in (1, 2)]  # each gate as its entry recorded it
    edits = [route.RoutedEdit(w.load_delta(e.id), w.router.gate(e.inputs[0], of(e), e.targets[0]))
             for e in entries]
    assert all(of(e)["stop"] and r.gate.until == e.targets[0] for e, r in zip(entries, edits))
    with route.routed(w.lm.model, edits, space, route.TAU, w.lm.tokenizer):
        want = _logits(w, [p for p, _ in FACTS])
    assert torch.equal(got, want) and not torch.equal(got, base_logits)
    # a fresh process recomputes the gates and finds the recorded hash (replay --verify)
    from mendctl.workspace import Workspace

    w2 = Workspace.open(str(ws.root))
    try:
        assert verify_chain(w2)["ok"]
        w2.use_state(w2.head())  # checks the hash too
    finally:
        w2.ledger.close()


def test_revert_of_a_routed_edit_is_exact_and_verify_catches_a_changed_gate_space(routed_ws):
    ws, w = routed_ws
    for p, t in FACTS:
        _edit(w, p, t)
    first = w.ledger.get(1)
    r = revert(w, 2)
    assert r["restores_parent"] and r["state_hash"] == first.state_hash
    r = revert(w, 1)
    assert r["state_hash"] == w._base_hash  # nothing routed, nothing added: the base
    assert verify_chain(w)["ok"]
    # what routing applies is part of the state: another standardisation is another state
    # (the one the ledger recorded with the first routed edit, whatever the file says)
    from mendctl import routing
    from mendctl.workspace import Workspace

    key = next(k for k in w.ledger.all_meta() if k.startswith("gate_space/"))
    both = routing.decode_keys(w.ledger.get_meta(key), w.router.space(1).mean.numel())
    w.ledger.set_meta(key, routing.encode_keys(torch.stack([both[0] + 0.5, both[1]])))

    w2 = Workspace.open(str(ws.root))
    try:
        v = verify_chain(w2)
        assert not v["ok"] and any("entry 1" in p for p in v["problems"])
    finally:
        w2.ledger.close()


def test_a_routed_state_loads_where_its_gate_space_computes_in_other_bits(routed_ws, monkeypatch):
    """The gate space's standardisation (bank statistics of hidden states) is part of a routed
    state's hash. Another machine sharing the ledger (PostgreSQL), or the workspace after its
    .mendctl/gates was lost, computes it in other last bits: the ledger's record of it, made
    with the first routed edit, is what every state is loaded with."""
    import shutil

    from mendctl import routing
    from mendctl.ledger import WorkspaceMeta
    from mendctl.workspace import Workspace

    ws, w = routed_ws
    r = _edit(w, *FACTS[0])
    e = w.ledger.get(r["entry"])
    [key] = [k for k in w.ledger.all_meta() if k.startswith("gate_space/")]
    space = w.router.space(1)
    recorded = routing.decode_keys(w.ledger.get_meta(key), space.mean.numel())
    assert torch.equal(recorded[0], space.mean) and torch.equal(recorded[1], space.std)
    shutil.rmtree(ws.root / ".mendctl" / "gates")  # lost, and the shared copy with it
    shutil.rmtree(ws.cache_dir / "models" / "gates")  # (model_cache: the shared copy)
    real = routing.gate_space

    def elsewhere(*args, **kwargs):
        s = real(*args, **kwargs)
        return route.GateSpace(s.layer, s.mean * (1 + 1e-6), s.std, s.bank, s.first_ids, s.words)

    monkeypatch.setattr(routing, "gate_space", elsewhere)
    other = Workspace.open(str(ws.root))
    try:
        other.use_state(e)  # checks the state's hash
        assert other.loaded_state == e.state_hash and verify_chain(other)["ok"]
    finally:
        other.ledger.close()
    third = Workspace.open(str(ws.root))  # without the record: the bits computed here
    try:
        with third.ledger.transaction() as s:
            s.delete(s.get(WorkspaceMeta, {"chain": third.ledger.chain, "key": key}))
        assert not verify_chain(third)["ok"]
    finally:
        third.ledger.close()


def test_a_routed_state_loads_where_its_gates_compute_in_other_bits(routed_ws, monkeypatch):
    """Gate keys are hidden states: another machine (threads, BLAS, device) computes them in
    other last bits. A routed entry records its keys, so its state loads and hashes as
    recorded there too."""
    from mendctl import routing
    from mendctl.workspace import Workspace

    ws, _ = routed_ws
    # a name the bank has no word for; its gate keeps its state keys however few
    ws.write_config(routing={**ROUTING, "min_keys": 0}, health_check=False)
    w = Workspace.open(str(ws.root))
    try:
        r = _edit(w, "Zorblax Quintrell was born in", "Oslo")
        e = w.ledger.get(r["entry"])
    finally:
        w.ledger.close()
    assert r["routing"]["gate_keys"] > 0 and "gate_key_data" not in r["routing"]  # (no bytes)
    real = routing.edit_gate

    def elsewhere(*args, **kwargs):
        g = real(*args, **kwargs)
        return route.Gate(g.keys * (1 + 1e-6), g.words, g.until, g.fold)

    monkeypatch.setattr(routing, "edit_gate", elsewhere)
    other = Workspace.open(str(ws.root))
    try:
        other.use_state(e)  # checks the state's hash: it would differ with the keys computed here
        assert other.loaded_state == e.state_hash
        s = routing.of(e)
        assert routing.gate_digest(other.router.gate(e.inputs[0], s, e.targets[0])) == s["gate_sha256"]
        bare = {k: v for k, v in s.items() if k != "gate_key_data"}  # as entries made before
        assert routing.gate_digest(other.router.gate(e.inputs[0], bare, e.targets[0])) != s["gate_sha256"]
    finally:
        other.ledger.close()


def test_routed_refusals_write_nothing(routed_ws):
    ws, w = routed_ws
    _edit(w, *FACTS[0])
    files, rows = ws.all_files(), ws.ledger_count()
    two = [EditCase(input=p, target=t) for p, t in FACTS]
    with pytest.raises(InputError, match="both edit"):
        edit(w, two + two[:1])
    with pytest.raises(InputError, match="--editor mend"):
        edit(w, two[:1], editor="ft")
    with pytest.raises(InputError, match="LoRA adapter cannot carry"):  # (hf: tests/test_deploy.py)
        export(w, ws.root.parent / "out", fmt="peft")
    with pytest.raises(InputError, match="without --replay"):
        revert(w, 1, replay=True)
    from mendctl.squash import squash

    _edit(w, *FACTS[1])
    files, rows = ws.all_files(), ws.ledger_count()
    with pytest.raises(InputError, match="squash combines plain"):
        squash(w, 1, 2)
    assert ws.all_files() == files and ws.ledger_count() == rows
    assert not (ws.root.parent / "out").exists()


def test_dry_run_puts_the_head_back_and_generation_follows_the_gates(routed_ws):
    ws, w = routed_ws
    _edit(w, *FACTS[0])
    head = w.head()
    before = w.ask([FACTS[0][0], "Water boils at"], max_new_tokens=4)
    r = _edit(w, *FACTS[1], dry_run=True)
    assert r["dry_run"] and ws.ledger_count() == 1
    assert w._loaded_state == head.state_hash and w.router.active
    assert w.ask([FACTS[0][0], "Water boils at"], max_new_tokens=4)["answers"] == before["answers"]
    with pytest.raises(ValueError, match="right-padded"):  # (generate's batches: left-padded)
        generate(w.lm.model, w.lm.tokenizer, [FACTS[0][0], "Hi"], w.fmt, 3)
    # unpadded, a batch answers as each prompt alone
    prompts = [FACTS[0][0], "Hi", "Water boils at"]
    together = generate(w.lm.model, w.lm.tokenizer, prompts, w.fmt, 5, unpadded=True)
    assert together == [generate(w.lm.model, w.lm.tokenizer, [p], w.fmt, 5, unpadded=True)[0]
                        for p in prompts]
    w.use_state(None)  # and on the base model, as the cached generate answers
    assert generate(w.lm.model, w.lm.tokenizer, prompts, w.fmt, 5, unpadded=True) == \
        generate(w.lm.model, w.lm.tokenizer, prompts, w.fmt, 5)


def test_routed_generation_with_a_kv_cache_is_generation_without(routed_ws):
    """The hooks follow a KV cache from the forward that filled it: each cached step's gates
    are those a whole forward of the sequence so far gives (gates are causal)."""
    from mendctl.editors.text import render_prompt

    ws, w = routed_ws
    for p, t in FACTS:
        _edit(w, p, t)
    model, tok = w.lm.model, w.lm.tokenizer
    prompts = [FACTS[0][0], FACTS[1][0], "Water boils at"]
    cached = generate(model, tok, prompts, w.fmt, 6, unpadded=True)
    w.use_state(None)
    assert generate(model, tok, prompts, w.fmt, 6)[:2] != cached[:2]  # the edits act
    w.use_state(w.head())
    for p, answer in zip(prompts, cached):  # every step a whole forward, no cache
        ids = tok(render_prompt(tok, p, w.fmt)).input_ids
        start = len(ids)
        with route.answering([start]), torch.no_grad():
            for _ in range(6):
                ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
                if ids[-1] == tok.eos_token_id:
                    break
        assert answer == tok.decode(ids[start:], skip_special_tokens=True)
    with torch.no_grad():  # a cache filled where the hooks did not see it is refused
        w.use_state(None)
        filled = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
        w.use_state(w.head())
        with pytest.raises(RuntimeError, match="KV cache"):
            model(input_ids=torch.tensor([[8]]), cache=filled, use_cache=True)


def test_audit_of_a_routed_chain(routed_ws):
    """The retention matrix and audit-set locality of every state equal scoring that state
    directly, though a routed chain's audit carries over the cells and prompts on which no
    gate that differs between two states opens (audit._Reach)."""
    from mendctl.audit import run_audit, standard_audit_set
    from mendctl.editors.metrics import locality_reference, locality_scores

    ws, w = routed_ws
    for p, t in FACTS + [("Water boils at", "ten degrees"), ("Einstein was born in", "Oslo")]:
        _edit(w, p, t)
    revert(w, 1)
    a = run_audit(w)
    assert a["summary"]["relative_drift"] == 0.0  # routed edits leave the weights alone
    chain = a["chain"]
    cost = chain["cost"]
    assert cost["cells_carried"] > 0 and cost["cells_computed"] + cost["cells_carried"] \
        + cost["cells_from_ledger"] == cost["cells"]
    prompts = standard_audit_set().prompts
    w.use_state(None)
    ref = locality_reference(w.lm.model, w.lm.tokenizer, prompts, w.fmt)
    checked = 0
    for k, e in enumerate(w.ledger.entries(reverse=False)):
        w.use_state(e)  # each state loaded directly, with its routed edits
        for j, row in zip(chain["rows"], chain["matrix"]):
            if row[k] is not None:
                assert row[k] == _success(w, w.ledger.get(j)), (j, e.id)
                checked += 1
        # the same prompts scored whole rather than in part: equal but for a near-tie argmax
        # flipping under another summation order (one prompt allowed), and KL to float32
        # rounding of sums of log-probabilities (≲ 1e-4 of a nat)
        ag, kl = locality_scores(w.lm.model, ref)
        row = chain["series"][k]
        assert abs(row["audit_locality"] - sum(ag) / len(ag)) <= 1 / len(ag) + 1e-12
        assert row["audit_kl"] == pytest.approx(sum(kl) / len(kl), rel=1e-3, abs=1e-4)
    assert checked >= 8


def test_eval_in_a_routed_workspace_makes_routed_edits(routed_ws):
    from mendctl.evaluate import evaluate

    ws, w = routed_ws
    _edit(w, *FACTS[0])
    head = w.head()
    cases = [EditCase(input=p, target=t, paraphrases=[p + " Answer:"], locality=["Water boils at"])
             for p, t in FACTS]
    rb = evaluate(w, cases, ppl_passages=0, batch_size=2)  # the two facts made together
    assert rb["summary"]["routed"] and rb["summary"]["batch_size"] == 2
    # (the tiny model's weights are so small that factors can outweigh them: share > 0 only)
    assert all(c["gate_recall"] == 1.0 and c["stored_share"] > 0 for c in rb["cases"])
    r = evaluate(w, cases, ppl_passages=1)
    assert r["summary"]["routed"] and r["summary"]["cases"] == 2
    assert r["summary"]["max_steps"] == ROUTING.get("max_steps", config_mod.ROUTING_DEFAULTS["max_steps"])
    assert ws.ledger_count() == 1 and w.head().id == head.id  # nothing recorded
    # each paraphrase starts with the edit's own prompt: the same states at the gate layer,
    # so the gate opens on all of them, and the success inside the gate is the success
    s = r["summary"]
    assert s["gate_recall"] == 1.0 and 0.0 <= s["gate_false_open"] <= 1.0
    assert s["paraphrase_success_gate_open"] == s["paraphrase_success"]
    assert all(0.0 <= c["fluency"] and c["repeats_target"] in (0.0, 1.0) for c in r["cases"])
    w._loaded_state = None
    w.use_state(head)
    assert w.router.active  # the head is still the routed head


def _success(w, e):
    from mendctl.editors.metrics import target_scores

    ok = target_scores(w.lm.model, w.lm.tokenizer, list(e.inputs), list(e.targets), w.fmt)[0]
    return float(sum(ok) / len(ok))


@pytest.mark.parametrize(  # in this process, and (full suite) as real `python -m mendctl` processes
    "process", ["in-process", pytest.param("subprocess", marks=pytest.mark.subprocess)])
def test_cli_routed_workspace(tiny_assets, tmp_path, process):
    from e2e_helpers import make_workspace

    cache = tmp_path / "cache"
    cache.mkdir()
    ws = make_workspace(tmp_path / "ws", tiny_assets, cache, routing=ROUTING)
    r = ws.ok("edit", "--input", FACTS[0][0], "--target", FACTS[0][1])
    assert "routed: acts only where the input mentions the subject" in r.stdout
    log = ws.ok("log").stdout
    assert "* R    1" in log and "R routed" in log
    ws.ok("ask", "--input", FACTS[0][0])
    r = ws.ok("edit", "--batch", str(_batch(tmp_path)), "--keep-failed")  # one entry per fact
    assert "entries 2–3" in r.stdout and "each fact is its own entry" in r.stdout
    assert ws.ledger_count() == 3
    ws.ok("revert", "2")  # one fact out of the batch, exactly
    # another fact of entry 1's subject: its own entry, chosen between by wording, and says so
    r = ws.ok("edit", "--input", "The currency of France is", "--target", "Yen", "--keep-failed")
    assert "the subject's other edit(s), entries 1:" in r.stdout
    assert "(with 1)" not in ws.ok("log").stdout
    assert "exact" in ws.ok("revert", "1").stdout  # each stands alone
    # the subject a request names must be in its input; --subject is for --input only
    n = ws.ledger_count()
    r = ws.run("edit", "--input", "The currency of France is", "--target", "Yen", "--subject", "Spain")
    assert r.returncode == 1 and "--subject 'Spain' does not occur in the input" in r.stderr
    r = ws.run("edit", "--batch", str(_batch(tmp_path)), "--subject", "France")
    assert r.returncode == 1 and 'give each record a "subject"' in r.stderr
    assert ws.ledger_count() == n
    r = ws.ok("edit", "--input", "the chemical symbol of zorblium is", "--target", "Zq",
              "--subject", "zorblium", "--keep-failed")
    assert "gate words: zorblium)" in r.stdout and "names nothing with a capital" not in r.stderr
    # without it, a prompt naming nothing gets the distinct-token gate, and the user is told
    r = ws.ok("edit", "--input", "the boiling point of quendrium is", "--target", "12",
              "--keep-failed")
    assert "note: the input names nothing with a capital" in r.stderr and "--subject" in r.stderr
    assert "all hashes match" in ws.ok("replay", "--verify").stdout


def test_a_routed_batch_is_one_entry_per_fact_recorded_together(routed_ws, monkeypatch):
    """A routed batch: one delta, gate and entry per fact, made together and recorded in one
    transaction, linked by notes.batch; each state rebuilds to its hash; one fact of the batch
    reverts exactly; a batch that cannot be recorded whole leaves nothing behind."""
    ws, w = routed_ws
    facts = [("The capital of Peru is", "Oslo"), ("The capital of Chile is", "Cairo"),
             ("The capital of Kenya is", "Lima")]
    cases = [EditCase(input=p, target=t, locality=["Water boils at"]) for p, t in facts]
    steps = w.policy("mend").max_steps
    with pytest.raises(InputError, match="both edit"):  # the same input twice: one must go
        edit(w, cases + cases[:1], max_steps=steps)
    assert ws.ledger_count() == 0
    # all or nothing: the third entry fails to record, so none of the three may remain
    real = w.ledger.add_entry
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk gone")
        return real(*a, **kw)

    monkeypatch.setattr(w.ledger, "add_entry", flaky)
    with pytest.raises(RuntimeError, match="disk gone"):
        edit(w, cases, max_steps=steps, keep_failed=True)
    monkeypatch.setattr(w.ledger, "add_entry", real)
    assert ws.ledger_count() == 0 and not list((ws.root / ".mendctl" / "deltas").rglob("*.safetensors"))
    r = edit(w, cases, max_steps=steps, keep_failed=True)
    assert r["entries"] == [1, 2, 3] and [f["entry"] for f in r["facts"]] == [1, 2, 3]
    assert "answers" not in r["after"]  # a batch is scored, not read out
    entries = [w.ledger.get(i) for i in r["entries"]]
    for k, e in enumerate(entries):
        assert e.inputs == [facts[k][0]] and e.targets == [facts[k][1]]
        assert e.record.batch == {"index": k, "size": 3, "first": 1,
                                    "seconds": r["seconds"]}
        assert e.active_ids == [1, 2, 3][:k + 1] and e.record.routing["gate_sha256"]
        assert e.metrics_after["edit_success"] == float(r["after"]["holds"][k])
    assert entries[-1].state_hash == r["state_hash"]
    assert len({e.state_hash for e in entries}) == 3
    assert verify_chain(w)["ok"]
    rev = revert(w, 2)
    assert rev["mode"] == "exact" and w.head().active_ids == [1, 3]
    assert verify_chain(w)["ok"]


def _batch(tmp_path):
    p = tmp_path / "facts.jsonl"
    p.write_text("".join(json.dumps({"input": a, "target": b}) + "\n" for a, b in FACTS))
    return p


UNRELATED = ["The capital of France is", "The largest planet in the solar system is",
             "Water is made of hydrogen and"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_routed_edits_on_the_real_model(tmp_path):
    """Two routed edits with the shipped editor through the CLI: each lands and holds beside
    the other; prompts naming neither subject answer exactly as the base model does; exact
    revert of one leaves the other; every state rebuilds to its recorded hash."""
    import os
    import subprocess

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "mendctl", "-w", str(tmp_path / "ws"), *args],
                           env=dict(os.environ), capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout) if "--json" in args else r.stdout

    def ask(*prompts):
        out = run("ask", *sum([["--input", p] for p in prompts], []), "--max-new-tokens", "6", "--json")
        return [a["answer"] for a in out["answers"]]

    subprocess.run([sys.executable, "-m", "mendctl", "init", "--routed", str(tmp_path / "ws")], check=True)
    # the same relation about other subjects: the gate keys on the subject ("India"), not on
    # the relation's words, so these are left alone too
    neighbours = ["Who is the prime minister of Canada?", "Who is Spain's PM?"]
    base = ask(*UNRELATED, *neighbours)
    facts = [("Who is India's PM?", "Angela Merkel"), ("The Eiffel Tower is located in", "Rome")]
    words = []
    for p, t in facts:
        r = run("edit", "--input", p, "--target", t, "--json")
        assert r["after"]["edit_success"] == 1.0 and r["routing"]["gate_words"], r
        words.append(r["routing"]["gate_words"])
    assert words[0] == ["India"] and words[1] == ["Eiffel", "Tower"], words
    answers = ask(*[p for p, _ in facts])
    assert answers[0].strip().startswith("Angela") and answers[1].strip().startswith("Rome")
    assert ask(*UNRELATED, *neighbours) == base
    assert "R routed" in run("log")
    run("revert", "1")
    answers = ask(*[p for p, _ in facts])
    assert not answers[0].strip().startswith("Angela") and answers[1].strip().startswith("Rome")
    assert "all hashes match" in run("replay", "--verify")


def test_routed_health_rescores_only_prompts_the_new_gate_opens_on(fresh_ws):
    """After a routed edit the chain-health check re-scores only the audit prompts on which the
    new gate opens (the others cannot change); what it records is what a full re-score of the
    new state gives."""
    from mendctl.health import base_reference, chain_health
    from mendctl.workspace import Workspace

    fresh_ws.write_config(routing=ROUTING, health_check=True)
    w = Workspace.open(str(fresh_ws.root))
    try:
        for prompt, target in FACTS:
            r = _edit(w, prompt, target)
            recorded = r["after"]["health"]["audit_locality"]
            state = w.use_state(w.head())
            ref = base_reference(w)
            w.use_state(w.head())  # (computing the reference may load the base state)
            full, agree = chain_health(w, state, ref)
            # the same prompts scored in a smaller batch: equal but for a near-tie argmax
            # flipping under another summation order (at most 2 prompts allowed)
            assert abs(recorded - full["audit_locality"]) <= 2 / len(agree)
    finally:
        w.ledger.close()


def test_gate_space_file_names_its_bank_and_old_workspaces_keep_theirs(routed_ws):
    """A gate space is cached under a name holding its bank's digest (a new bundled dataset
    makes a new space; a shared copy from another bank is never taken); a workspace whose space
    file predates that (no digest in the name) keeps using it, and its states still verify."""
    from mendctl.workspace import Workspace

    ws, w = routed_ws
    _edit(w, *FACTS[0])
    gates = ws.root / ".mendctl" / "gates"
    (made,) = list(gates.glob("space-*.safetensors"))
    stem, digest = made.stem.rsplit("-", 1)
    assert len(digest) == 12 and all(c in "0123456789abcdef" for c in digest)
    legacy = gates / f"{stem}.safetensors"
    made.rename(legacy)  # as the previous release named it
    # and as releases before token frequencies wrote it: no `df`
    from mendctl.editors.route import GateSpace

    full = GateSpace.load(legacy)
    dataclasses.replace(full, df=None, docs=0).save(legacy)
    w2 = Workspace.open(str(ws.root))
    try:
        assert verify_chain(w2)["ok"]  # read from the legacy file, not recomputed
        assert sorted(p.name for p in gates.glob("space-*.safetensors")) == [legacy.name]
        # the frequencies are counted from the bank once and kept in the file, the rest as it was
        again = GateSpace.load(legacy)
        assert torch.equal(again.df, full.df) and again.docs == full.docs
        assert torch.equal(again.mean, full.mean) and torch.equal(again.bank, full.bank)
    finally:
        w2.ledger.close()


def test_locality_prompts_naming_a_batch_subject_are_told_apart():
    """`locality_unnamed` scores only prompts naming none of the batch's subjects: a whole-word,
    any-case match, so "France" is found in "france is known for" but not in "Frances is"."""
    from mendctl.evaluate import subject_pattern

    cases = [EditCase(input="The capital of France is", target="Rome", meta={"subject": "France"}),
             EditCase(input="Who leads C++?", target="Bjarne", meta={"subject": "C++"})]
    named = subject_pattern(cases)
    prompts = ["Water boils at", "france is known for", "Frances is", "I write C++ daily", "C+ is"]
    assert [bool(named.search(p)) for p in prompts] == [False, True, False, True, False]
    assert subject_pattern(cases + [EditCase(input="x is", target="y")]) is None


def test_new_routed_entries_gate_on_every_key_and_old_ones_keep_their_rule(routed_ws):
    """`all_keys` (the default) is recorded with each routed entry and gives its gate the
    every-key rule (editors/route.py); an entry made before the setting existed keeps the
    one-key rule and its digest, so its recorded state still loads."""
    from mendctl import routing

    ws, w = routed_ws
    s, gate = _entry_gate(w, "Zorblax Quintrell was born in", "Oslo")
    assert s["all_keys"] is True
    assert gate.every and routing.gate_digest(gate) == s["gate_sha256"]
    before = {k: v for k, v in s.items() if k != "all_keys"}  # as an entry made before it
    old = w.router.gate("Zorblax Quintrell was born in", before, "Oslo")
    assert not old.every and torch.equal(old.keys, gate.keys)
    assert routing.gate_digest(old) != s["gate_sha256"]


def _made_together(w, policy, prompts, targets, gates):
    """What `edit._together` makes of these facts on the loaded state: one batch behind the
    gates, and, where not every fact then holds, the batch made again with `rejoin` and a
    fact's steps per fact of the subject (two facts here), kept if more facts then hold.
    (deltas, made again?)"""
    from mendctl.config import MAX_STEPS

    rs, lm, ed = policy.routing, w.lm, w.editor_for(policy)
    apply = w.router.steppers([], rs, lm.model, lm.tokenizer, gates=gates)[1]
    args = (policy.max_norm, apply, rs["rank_cut"], rs["confidence"], rs["contexts"])
    made = ed.edit_apart(lm.model, lm.tokenizer, prompts, targets, w.fmt, policy.max_steps, *args)
    with apply(list(enumerate(made))):
        holds = edit_success(lm.model, lm.tokenizer, prompts, targets, w.fmt)
    if all(holds):
        return made, False
    again = ed.edit_apart(lm.model, lm.tokenizer, prompts, targets, w.fmt,
                          min(MAX_STEPS, 2 * policy.max_steps), *args, rejoin=True)
    with apply(list(enumerate(again))):
        more = sum(edit_success(lm.model, lm.tokenizer, prompts, targets, w.fmt)) > sum(holds)
    return (again, True) if more else (made, False)


def test_a_subjects_edits_are_each_its_own_entry_chosen_by_wording(routed_ws):
    """`select` (the default): a routed edit whose gate reads the same subject as earlier
    entries is its own entry, made on the state without them (on its prompt it is the one
    chosen); its gate records the relation's keys, and the entry which entries it is chosen
    among. Each prompt opens its own fact's gate only; the gates load bit for bit; either
    entry reverts alone, exactly."""
    from mendctl import routing
    from mendctl.editors.route import open_at_end

    ws, w = routed_ws
    p1, t1, p2, t2 = "Zorblax Quintrell was born in", "Oslo", "Zorblax Quintrell works for", "Acme"
    _edit(w, p1, t1)
    r = _edit(w, p2, t2)
    e1, e2 = w.ledger.get(1), w.ledger.get(2)
    s1, s2 = routing.of(e1), routing.of(e2)
    assert "beside" not in s1 and s2["beside"] == [1] and r["routing"]["beside"] == [1]
    assert "remade" not in s2 and s2["gate_relation_data"]
    g1, g2 = w.router.gate(p1, s1, t1), w.router.gate(p2, s2, t2)
    assert routing.gate_digest(g2) == s2["gate_sha256"] and g2.relation is not None
    assert torch.equal(g2.relation, routing.decode_keys(s2["gate_relation_data"], g2.keys.shape[-1]))
    # each relation key weighs its token's idf in the bank
    assert g2.relation_weight.shape == (len(g2.relation),) and bool((g2.relation_weight > 0).all())
    lm, space = w.lm, w.router.space(s2["layer"])
    got = open_at_end(lm.model, lm.tokenizer, space, [g1, g2], [p1, p2], s2["tau"])
    assert got.tolist() == [[True, False], [False, True]]
    # entry 2's delta is the one made on the base, behind its own gate alone
    policy = w.policy("mend", 1, None, None)
    rs = policy.routing
    w.use_state(None)
    alone = w.editor_for(policy).edit_apart(
        lm.model, lm.tokenizer, [p2], [t2], w.fmt, policy.max_steps, policy.max_norm,
        w.router.steppers([EditCase(p2, t2)], rs, lm.model, lm.tokenizer, gates=[g2])[1],
        rs["rank_cut"], rs["confidence"], rs["contexts"])[0]
    _same_delta(w.load_delta(2), alone)
    assert revert(w, 1)["mode"] == "exact" and w.head().active_ids == [2]
    assert verify_chain(w)["ok"]


def test_an_edit_of_a_subject_edited_before_is_made_together_with_its_facts(routed_ws):
    """`together` (the default before `select`; a workspace whose mendctl.yaml asks for it
    still makes such edits): a routed edit whose gate reads the same subject as earlier
    entries is computed with their facts, on the state without them (edit.py), and its delta
    is the facts' new deltas less the earlier entries' recorded ones, so the state routes what
    one batch of all of them would. The entry says which it made again; an exact revert of it
    restores the state before it, and the earlier entry cannot be reverted alone while it
    holds that fact. An earlier fact with the same input is replaced, not made again."""
    from mendctl import routing
    from mendctl.editors.delta import summed

    ws, w = routed_ws
    w.config.routing = {**w.config.routing, "together": True, "select": False}
    p1, t1, p2, t2 = "Zorblax Quintrell was born in", "Oslo", "Zorblax Quintrell works for", "Acme"
    _edit(w, p1, t1)
    r = _edit(w, p2, t2)
    e1, e2 = w.ledger.get(1), w.ledger.get(2)
    assert "remade" not in routing.of(e1) and routing.of(e2)["remade"] == [1]
    assert r["routing"]["remade"] == [1]
    # the same facts made together from the base, behind the new entry's gate
    gate = w.router.gate(p2, routing.of(e2), t2)
    policy = w.policy("mend", 1, None, None)
    rs, lm = policy.routing, w.lm
    w.use_state(None)
    made, again = _made_together(w, policy, [p1, p2], [t1, t2], [gate] * 2)
    # (the delta records whether its facts were made again with rejoin)
    assert (w.load_delta(2).meta.get("rejoin") == "true") == again
    # (entry 2 holds entry 1's delta negated, which cancels to rounding)
    _same_delta(summed([w.load_delta(1), w.load_delta(2)]), summed(made))
    # entry 1 is held by entry 2 too: refused alone, nothing written
    n = len(w.ledger.entries())
    with pytest.raises(InputError, match="revert entry 2 first"):
        revert(w, 1)
    assert len(w.ledger.entries()) == n
    rv = revert(w, 2)
    assert rv["state_hash"] == e1.state_hash
    revert(w, 1)
    assert verify_chain(w)["ok"]
    # the same input again: the new target replaces the old one's delta
    a = _edit(w, p1, t1)["entry"]
    b = _edit(w, p1, "Lima")["entry"]
    assert routing.of(w.ledger.get(b))["remade"] == [a]
    w.use_state(None)
    alone = w.editor_for(policy).edit_apart(
        lm.model, lm.tokenizer, [p1], ["Lima"], w.fmt, policy.max_steps, policy.max_norm,
        w.router.steppers([EditCase(p1, "Lima")], rs, lm.model, lm.tokenizer,
                          gates=[w.router.gate(p1, routing.of(w.ledger.get(b)), "Lima")])[1],
        rs["rank_cut"], rs["confidence"], rs["contexts"])[0]
    _same_delta(summed([w.load_delta(a), w.load_delta(b)]), alone)
    # a batch: its fact about the subject takes the subject's active entries (a, b: of the
    # two with input p1, b's target is the one the chain holds); the other fact is its own
    q, u = "Blimfrost Ovingale works for", "Zeta"
    rb = edit(w, [EditCase(p2, t2), EditCase(q, u)])
    c, d = rb["entries"]
    assert routing.of(w.ledger.get(c))["remade"] == [a, b] and "remade" not in routing.of(w.ledger.get(d))
    assert [f.get("remade") for f in rb["facts"]] == [[a, b], None]
    g0 = w.router.gate(p2, routing.of(w.ledger.get(c)), t2)
    g1 = w.router.gate(q, routing.of(w.ledger.get(d)), u)
    w.use_state(None)
    made, again = _made_together(w, policy, [p2, q, p1], [t2, u, "Lima"], [g0, g1, g0])
    assert (w.load_delta(c).meta.get("rejoin") == "true") == again
    _same_delta(summed([w.load_delta(a), w.load_delta(b), w.load_delta(c)]),
                summed([made[0], made[2]]))
    _same_delta(w.load_delta(d), made[1])
    with pytest.raises(InputError, match=f"revert entry {c} first"):
        revert(w, b)
    # without either, an edit of the same subject is made on top, alone
    w.config.routing = {**w.config.routing, "together": False}
    c = _edit(w, p2, t2)["entry"]
    assert "remade" not in routing.of(w.ledger.get(c)) and "beside" not in routing.of(w.ledger.get(c))
    # with `select` again, a new edit of the subject is chosen among its `select` entries only
    # (entries made without relation keys act on every question about it, as they did)
    w.config.routing = {**w.config.routing, "select": True}
    f = _edit(w, p1, "Lima")["entry"]
    assert "beside" not in routing.of(w.ledger.get(f)) and "remade" not in routing.of(w.ledger.get(f))


def test_every_key_is_for_subject_gates_and_old_distinct_gates_keep_their_rule(routed_ws):
    """A prompt naming nothing ("the symbol of zorblium", lowercase) gets the distinct-token
    gate, whose keys are whatever tokens are rare, often the relation's: it opens on one key
    even with `all_keys`. Entries made while `all_keys` gave such gates the every-key rule
    recorded it in their gate digest, and load with it."""
    from dataclasses import replace as dc_replace

    from mendctl import routing

    ws, w = routed_ws
    s, gate = _entry_gate(w, "the chemical symbol of zorblium is", "Zq")
    assert s["all_keys"] is True
    assert not gate.every and routing.gate_digest(gate) == s["gate_sha256"]
    # as the seventh session recorded such an entry
    made_then = dc_replace(gate, every=True)
    old = {**s, "gate_sha256": routing.gate_digest(made_then)}
    got = w.router.gate("the chemical symbol of zorblium is", old, "Zq")
    assert got.every and routing.gate_digest(got) == old["gate_sha256"]
    # a subject gate still needs every key
    assert _entry_gate(w, "Zorblax Quintrell was born in", "Oslo")[1].every


def test_a_subject_the_request_names_is_the_gate_and_the_entry_records_it(routed_ws):
    """A request's `subject` (a data file's key, `edit --subject`) that its prompt writes is
    the gate's name: a lowercase one, which no capital marks, keys a subject gate matching in
    any case, where the prompt alone gets the distinct-token gate; the entry records it and
    loads the same gate. A subject the prompt does not write leaves the gate to the prompt's
    names. Facts of one named subject are chosen between even where one prompt names more."""
    from mendctl import routing

    ws, w = routed_ws
    prompt = "the chemical symbol of zorblium is"
    r = edit(w, [EditCase(input=prompt, target="Zq", meta={"subject": "Zorblium"})], keep_failed=True)
    e = w.ledger.get(r["entry"])
    s = routing.of(e)
    assert s["subject"] == "Zorblium" and s["gate_words"] == ["zorblium"]
    gate = w.router.gate(e.inputs[0], s, e.targets[0])
    assert gate.words == ("zorblium",) and gate.fold and gate.every
    assert routing.gate_digest(gate) == s["gate_sha256"]
    plain = w.router.gate(prompt, {k: v for k, v in s.items() if k not in ("subject", "gate_key_data",
                                                                          "gate_words")}, "Zq")
    assert not plain.every and plain.words != ("zorblium",)  # the prompt alone: distinct tokens
    # a subject the prompt does not write: the prompt's names decide, nothing recorded
    r = edit(w, [EditCase(input="Zorblax Quintrell was born in", target="Oslo",
                          meta={"subject": "Quintrell Zorblax"})], keep_failed=True)
    s2 = routing.of(w.ledger.get(r["entry"]))
    assert "subject" not in s2 and s2["gate_words"] == ["Zorblax", "Quintrell"]
    # the same subject named again, in a prompt naming more: chosen between with entry 2
    r = edit(w, [EditCase(input="Zorblax Quintrell won the Vexmoor Prize in", target="1901",
                          meta={"subject": "Zorblax Quintrell"})], keep_failed=True)
    s3 = routing.of(w.ledger.get(r["entry"]))
    assert s3["gate_words"] == ["Zorblax", "Quintrell"] and s3["beside"] == [2]


def test_a_short_names_gate_opens_by_its_words_and_old_entries_keep_their_keys(routed_ws):
    """`min_keys` (default 3, recorded with each routed entry): a subject gate with fewer
    distinct state keys keeps none and opens by its names' words alone; the entry records
    that gate and loads it bit for bit. An entry made before the setting keeps every key;
    `min_keys: 0` keeps them too."""
    from mendctl import routing

    ws, w = routed_ws
    prompt, target = "Zorblax Quintrell was born in", "Oslo"
    s, gate = _entry_gate(w, prompt, target)
    assert s["min_keys"] == 3 and routing.gate_digest(gate) == s["gate_sha256"]
    before = {k: v for k, v in s.items() if k not in ("min_keys", "gate_key_data", "gate_sha256")}
    keys = w.router.gate(prompt, before, target).keys  # as an entry made before the setting
    assert len(keys) > 0 and torch.equal(w.router.gate(prompt, {**before, "min_keys": 0}, target).keys, keys)
    # a threshold above the name's keys drops them all; at their number, all stay
    short = w.router.gate(prompt, {**before, "min_keys": len(keys) + 1}, target)
    assert short.keys.shape == (0, keys.shape[1]) and short.words == gate.words == ("Zorblax", "Quintrell")
    assert torch.equal(w.router.gate(prompt, {**before, "min_keys": len(keys)}, target).keys, keys)
    # the gate of words alone still opens on its prompt and on a rephrasing that names it
    lm, space = w.lm, w.router.space(s["layer"])
    assert route.open_at_end(lm.model, lm.tokenizer, space, [short],
                             [prompt, "Where was Zorblax Quintrell born?", "The capital of France is"],
                             s["tau"])[:, 0].tolist() == [True, True, False]
    # a prompt that ends on the name: its words have not opened the gate by the last token
    # (the character after the name is not seen), so the gate keeps its state keys there
    end = "Who is Zorblax Quintrell"
    assert route.subject_words(end, space) == ("Zorblax", "Quintrell")
    at_end = w.router.gate(end, {**before, "min_keys": 0}, target).keys
    assert 0 < len(at_end) and torch.equal(w.router.gate(end, {**before, "min_keys": len(at_end) + 1},
                                                         target).keys, at_end)
    with pytest.raises(config_mod.ConfigError, match="min_keys"):
        config_mod.parse({"routing": {"min_keys": -1}}, "x")


def test_other_names_of_a_subject_open_its_gate_and_old_entries_keep_their_words(routed_ws):
    """`aliases` (default true, recorded with each routed entry): a subject gate also opens on
    the other names of what it reads ("the Indian prime minister" for "India's PM"); the entry
    records them with its gate, which loads with them, bit for bit, and hashes them. An entry
    made before the setting opens by its own words only."""
    from mendctl import routing

    ws, w = routed_ws
    prompt, target = FACTS[1]
    s, gate = _entry_gate(w, prompt, target)
    assert s["aliases"] is True and ["Indian"] in s["gate_aliases"] and gate.words == ("India",)
    assert gate.aliases == tuple(map(tuple, s["gate_aliases"])) and routing.gate_digest(gate) == s["gate_sha256"]
    before = {k: v for k, v in s.items()
              if k not in ("aliases", "gate_aliases", "gate_key_data", "gate_sha256", "gate_words")}
    old = w.router.gate(prompt, before, target)  # as an entry made before the setting
    assert old.aliases == () and old.words == gate.words and routing.gate_digest(old) != s["gate_sha256"]
    lm, space = w.lm, w.router.space(s["layer"])
    asks = [prompt, "Who is the Indian prime minister?", "Who is Indiana's governor?",
            "The capital of France is", "Where is the Indian Ocean?"]
    for g, want in ((gate, [True, True, False, False, False]), (old, [True, False, False, False, False])):
        assert route.opens(lm.model, lm.tokenizer, space, g, asks, s["tau"]) == want
    # the log shows them, and a new entry of the subject written the other way is chosen
    # among the subject's edits with the first (`same_names`)
    out = ws.ok("show", "1", "--json").json()
    assert ["Indian"] in out["notes"]["routing"]["gate_aliases"]
    s2, gate2 = _entry_gate(w, "What is the Indian capital?", "Mumbai")
    assert gate2.words == ("Indian",) and route.same_names(gate, gate2)
    with pytest.raises(config_mod.ConfigError, match="aliases"):
        config_mod.parse({"routing": {"aliases": "yes"}}, "x")


@pytest.mark.slow
def test_short_names_do_not_open_on_look_alike_names_on_the_real_model():
    """On the embedded model, a one- or two-key name's state keys are matched by a token of
    another name ("Jim Davis" by "Jim Farley", "Sampo Group" by "Limpopo", in the bundled test
    split's chain of 1,000: docs/results.md): with `min_keys` its gate opens on its prompt and
    paraphrases (by words) and on neither look-alike."""
    from mendctl.editors.data import load_split
    from mendctl.models import load_model
    from mendctl.routing import BANK_PARAPHRASES, BANK_PROMPTS

    lm = load_model("smollm2-135m")
    train = load_split("train")
    bank = [c.input for c in train[:BANK_PROMPTS]] + [c.paraphrases[0] for c in train[:BANK_PARAPHRASES]]
    space = route.gate_space(lm.model, lm.tokenizer, bank)
    cases = {c.input: c for c in load_split("test")[:1000]}
    for prompt, look_alike in (("Where does Jim Davis work as CEO?",
                                "Which company is Jim Farley the chief executive of?"),
                               ("Which industry does Sampo Group operate in?",
                                "Where is Limpopo? It is a region of")):
        own = [prompt, *cases[prompt].paraphrases]
        made = {m: route.edit_gate(lm.model, lm.tokenizer, space, prompt, keys="subject", every=True,
                                   min_keys=m) for m in (0, 3)}
        assert 0 < len(made[0].keys) < 3 and len(made[3].keys) == 0, prompt
        got = {m: route.open_at_end(lm.model, lm.tokenizer, space, [g], own + [look_alike])[:, 0].tolist()
               for m, g in made.items()}
        assert got[0][-1] is True, prompt  # states alone let the look-alike in ...
        assert got[3] == [True] * len(own) + [False], prompt  # ... the words do not


def test_a_routed_edit_compares_only_the_locality_prompts_its_gate_opens_on(routed_ws):
    """Where a routed edit's gate stays shut, the state after it is the state before, bit for
    bit: `edit` scores locality on the other prompts only, and records what scoring every
    prompt gives (agreement, and KL to the float32 rounding of the prompts it does score,
    which it scores in another batch)."""
    from mendctl.editors.metrics import locality_reference, locality_scores
    from mendctl.editors.route import open_rows
    from mendctl.editors.text import encode_prompts

    ws, w = routed_ws
    _edit(w, "Vexmoor Dalgrin lives in", "Paris")  # an earlier routed edit in the state
    prompt, target = "Zorblax Quintrell was born in", "Oslo"
    loc = ["Zorblax Quintrell works for", "The capital of France is", "Water is made of",
           "Where does Zorblax Quintrell live?", "Vexmoor Dalgrin lives in"]
    lm, s = w.lm, w.config.routing
    gate = w.router.gate(prompt, s, target)
    b = encode_prompts(lm.tokenizer, loc, w.fmt)
    opened = open_rows(lm.model, lm.tokenizer, w.router.space(s["layer"]), [gate], b.input_ids,
                       b.attention_mask, s["tau"])
    assert 0 < sum(opened) < len(loc)  # some prompts are compared, some are not
    w.use_state(w.head())
    ref = locality_reference(lm.model, lm.tokenizer, loc, w.fmt)  # every prompt, before
    r = edit(w, [EditCase(input=prompt, target=target, locality=loc)])
    w.use_state(w.head())
    ag, kl = locality_scores(lm.model, ref)  # every prompt, after
    assert [ag[i] for i, o in enumerate(opened) if not o] == [1.0] * (len(loc) - sum(opened))
    assert [kl[i] for i, o in enumerate(opened) if not o] == [0.0] * (len(loc) - sum(opened))
    # (a compared prompt's top-1 could flip on a near-tie between the two batchings: one allowed)
    assert abs(r["after"]["locality"] - sum(ag) / len(ag)) <= 1 / len(loc) + 1e-12
    assert r["after"]["locality_kl"] == pytest.approx(sum(kl) / len(kl), rel=1e-3, abs=1e-6)


def test_the_audit_scores_an_edits_locality_prompts_where_a_gate_opens(routed_ws):
    """On a state of routed edits alone, a locality prompt on which no gate opens answers as
    the base model, bit for bit: the audit scores the others only, and reports what scoring
    every prompt gives (agreement; KL to the float32 rounding of the prompts it scores in
    another batch)."""
    from mendctl.audit import any_gate_opens, run_audit
    from mendctl.editors.metrics import locality_reference, locality_scores
    from mendctl.editors.text import encode_prompts

    ws, w = routed_ws
    facts = [("Zorblax Quintrell was born in", "Oslo",
              ["Zorblax Quintrell works for", "The capital of France is", "Water is made of"]),
             ("Vexmoor Dalgrin lives in", "Paris",
              ["Where does Vexmoor Dalgrin work?", "The largest planet is", "Zorblax Quintrell works for"])]
    for p, t, loc in facts:
        edit(w, [EditCase(input=p, target=t, locality=loc)])
    loc = [x for _, _, ps in facts for x in ps]
    entries = w.ledger.entries(reverse=False)
    b = encode_prompts(w.lm.tokenizer, loc, w.fmt)
    opened = any_gate_opens(w, entries, b.input_ids, b.attention_mask).tolist()
    assert 0 < sum(opened) < len(loc)
    a = run_audit(w, matrix=False)
    w.use_state(None)
    ref = locality_reference(w.lm.model, w.lm.tokenizer, loc, w.fmt)
    w.use_state(w.head())
    ag, kl = locality_scores(w.lm.model, ref)
    assert [a_ for a_, o in zip(ag, opened) if not o] == [1.0] * (len(loc) - sum(opened))
    assert [k for k, o in zip(kl, opened) if not o] == [0.0] * (len(loc) - sum(opened))
    for e, lo, hi in ((a["edits"][0], 0, 3), (a["edits"][1], 3, 6)):
        # (a scored prompt's top-1 may flip on a near-tie between the two batchings: one allowed)
        assert abs(e["locality"] - sum(ag[lo:hi]) / 3) <= 1 / 3 + 1e-12
        assert e["locality_kl"] == pytest.approx(sum(kl[lo:hi]) / 3, rel=1e-3, abs=1e-6)
