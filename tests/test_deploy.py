"""A routed state exported with `mendctl export --format hf` and loaded with
`mendctl.load_edited`: a regular transformers model, with the routed edits installed, that
generates what `mendctl ask` answers at that state and scores as the workspace's model does."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import fresh_ws, one_line_error, tiny_assets  # noqa: E402,F401

ROUTING = {"layer": 1}  # the tiny model edits blocks 1-3; the gate sits below them
FACTS = [("The capital of France is", "Rome"), ("Who is India's PM?", "Angela Merkel")]
# a second fact of the first fact's subject: the two are chosen between by their wording
SAME_SUBJECT = ("The currency of France is", "Yen")
# (the last: a gate opened by another name of its subject, `Gate.aliases`)
PROMPTS = [p for p, _ in FACTS] + [SAME_SUBJECT[0], "Water boils at", "The Eiffel Tower is in",
                                   "Who is the Indian prime minister?"]


def test_routed_state_exports_and_loads_as_a_transformers_model(fresh_ws, tmp_path):
    import mendctl
    from mendctl.deploy import ROUTES_FILE

    ws = fresh_ws
    ws.write_config(routing=ROUTING, health_check=False)
    for p, t in FACTS:
        ws.ok("edit", "--input", p, "--target", t)
    ws.ok("edit", "--input", SAME_SUBJECT[0], "--target", SAME_SUBJECT[1], "--keep-failed")
    out = tmp_path / "edited"
    r = ws.ok("export", "--out", out)
    assert "mendctl.load_edited" in r.stdout and (out / ROUTES_FILE).is_file()
    from safetensors import safe_open

    with safe_open(str(out / ROUTES_FILE), "pt") as f:  # relation keys and aliases travel with the gates
        assert f.metadata()["format_version"] == "5"
        assert ["Indian"] in json.loads(f.metadata()["edits"])[1]["aliases"]
        assert {"edit0/gate.relation", "edit2/gate.relation", "edit2/gate.relation_weight",
                "space1/df"} <= set(f.keys())
    assert not list(out.glob("*.py")) and not list(out.glob("*.pkl")) and not list(out.glob("*.bin"))
    msg = one_line_error(ws.run("export", "--out", tmp_path / "adapter", "--format", "peft"))
    assert "--format hf" in msg and "load_edited" in msg

    n = 12
    asked = ws.ok("ask", *sum([["--input", p] for p in PROMPTS], []), "--max-new-tokens", str(n),
                  "--json").json()["answers"]
    model, tok = mendctl.load_edited(out)
    assert model.generation_config.use_cache is False
    for a in asked:
        ids = tok(a["input"], return_tensors="pt").input_ids
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True) == a["answer"], a

    # the same logits as the workspace's routed model, and not the plain weights' alone
    from mendctl.workspace import Workspace

    w = Workspace.open(str(ws.root))
    try:
        w.use_state(w.head())
        ids = tok(FACTS[0][0] + " " + FACTS[0][1], return_tensors="pt").input_ids
        with torch.no_grad():
            ref = w.lm.model(input_ids=ids).logits
            got = model(input_ids=ids).logits
            model.mendctl_routes.close()  # the hooks off: the plain exported weights
            plain = model(input_ids=ids).logits
    finally:
        w.ledger.close()
    scale = ref.abs().max()
    # the same float32 operations in the same order: equal up to a few roundings of the logits
    assert (got - ref).abs().max() <= 1e-5 * scale
    assert (plain - ref).abs().max() > 1e-3 * scale  # the routed edits are what made the difference


def test_a_new_workspace_reuses_the_gate_space_another_one_computed(fresh_ws, tiny_assets, tmp_path,
                                                                     monkeypatch):
    """The gate space (one forward over the bank of ordinary prompts) is computed once per base
    model on a machine: a second workspace copies it from the user's cache into its own
    .mendctl/gates (which its states' hashes rely on wherever it goes)."""
    from e2e_helpers import init_workspace_inprocess

    from mendctl import routing
    from mendctl.workspace import Workspace

    fresh_ws.write_config(routing=ROUTING, health_check=False)
    first = Workspace.open(str(fresh_ws.root))
    a = first.router.space(1)
    other = init_workspace_inprocess(tmp_path / "other", tiny_assets, fresh_ws.cache_dir,
                                     routing=ROUTING, health_check=False)

    def no_compute(*args, **kw):
        raise AssertionError("the gate space was computed again")

    monkeypatch.setattr(routing, "gate_space", no_compute)
    second = Workspace.open(str(other.root))
    b = second.router.space(1)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert list((other.state_dir / "gates").glob("space-*.safetensors"))
    first.ledger.close()
    second.ledger.close()
