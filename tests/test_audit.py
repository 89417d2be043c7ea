"""Audits on a short chain of edits of the tiny model: what counts, what an unchanged model
scores, the retention matrix against direct scoring, incremental reuse, the report files and
the CLI's checks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import (CHAIN, chain, clone_workspace, init_workspace_inprocess,  # noqa: E402,F401
                         one_line_error, tiny_assets)
from mendctl.revert import revert  # noqa: E402
from mendctl.edit import edit  # noqa: E402


@pytest.fixture
def ws_chain(chain, tmp_path):
    from mendctl.workspace import Workspace

    copy = clone_workspace(chain.ws, tmp_path / "ws")
    w = Workspace.open(str(copy.root))
    yield copy, w
    w.ledger.close()


def test_reverted_edit_is_not_counted_and_unchanged_model_is_local(ws_chain):
    from mendctl.audit import run_audit

    _, w = ws_chain
    r = run_audit(w, matrix=False)
    assert r["summary"]["active_edits"] == 3
    assert [e["entry"] for e in r["edits"]] == [1, 2, 3]
    assert all(0.0 <= e["edit_success"] <= 1.0 for e in r["edits"])
    # each edited prompt's answer, its fluency beside the unedited model's, repeated targets
    assert all(isinstance(e["answer"], str) and e["repeats_target"] in (0.0, 1.0) for e in r["edits"])
    s = r["summary"]
    assert s["fluency"] >= 0.0 and s["fluency_base"] >= 0.0 and 0.0 <= s["repeats_target"] <= 1.0

    revert(w, 2)
    r = run_audit(w, matrix=False)
    assert [e["entry"] for e in r["edits"]] == [1, 3]
    assert r["summary"]["state"] == 4

    revert(w, 1)
    revert(w, 3)  # nothing active: the state is the base model, bit for bit
    r = run_audit(w, matrix=False)
    s = r["summary"]
    assert s["active_edits"] == 0 and r["edits"] == []
    assert s["audit_locality"] == 1.0 and s["audit_kl"] == 0.0
    assert s["relative_drift"] == 0.0 and s["ppl_drawdown"] == 0.0
    assert r["flags"] == []


def test_edit_time_health_is_what_the_audit_measures(ws_chain):
    """The chain health `mendctl edit` records with each entry is the audit's audit-set
    agreement and relative drift of that state, computed from the cached base reference."""
    from mendctl.audit import run_audit
    from mendctl.config import load as load_config
    from mendctl.editors.data import EditCase

    copy, w = ws_chain
    series = {x["entry"]: x for x in run_audit(w)["chain"]["series"]}
    entries = w.ledger.entries(reverse=False)
    assert len(entries) == 3 and all(e.id in series for e in entries)
    for e in entries:
        h = e.record.health
        assert h["audit_locality"] == pytest.approx(series[e.id]["audit_locality"], abs=1e-12)
        assert h["relative_drift"] == pytest.approx(series[e.id]["relative_drift"], rel=1e-9)
        assert h["below_threshold"] == (h["audit_locality"] < h["locality_threshold"])
    assert len(list((w.state_dir / "health").glob("*.safetensors"))) == 1  # computed once

    cfg = (copy.root / "mendctl.yaml").read_text()
    (copy.root / "mendctl.yaml").write_text(cfg + "health_check: false\n")
    assert load_config(copy.root / "mendctl.yaml").health_check is False
    w.config.health_check = False  # the open workspace read the file before
    r = edit(w, [EditCase(input="Water boils at", target="ten degrees")])
    assert "health" not in r["after"] and w.ledger.get(r["entry"]).record.health is None


@pytest.fixture
def ft_chain(tiny_assets, tmp_path):
    """Three fine-tuning edits of the tiny model: they hold when made (FT runs until the
    target is the argmax), so retention values are not all zero."""
    from mendctl.editors.data import EditCase
    from mendctl.workspace import Workspace

    cache = tmp_path / "cache"
    cache.mkdir()
    ws = init_workspace_inprocess(tmp_path / "ws", tiny_assets, cache)
    w = Workspace.open(str(ws.root))
    ft = w.editor("ft")
    ft.lr, ft.steps = 0.05, 60  # the tiny random model needs larger steps than a real one
    for x, y in CHAIN:
        edit(w, [EditCase(input=x, target=y)], editor="ft")
    yield w
    w.ledger.close()


def test_retention_matrix_equals_scoring_each_state_and_is_reused(ft_chain):
    from mendctl.audit import record_audit, run_audit
    from mendctl.editors.metrics import target_scores

    w = ft_chain
    assert all(e.metrics_after["edit_success"] == 1.0 for e in w.ledger.entries())
    revert(w, 1)  # a column where edit 1 is no longer active
    r = run_audit(w)
    c = r["chain"]
    assert c["rows"] == [1, 2, 3] and c["columns"] == [1, 2, 3, 4]
    by_id = {e.id: e for e in w.ledger.entries()}
    for k_idx, k in enumerate(c["columns"]):
        w.use_state(by_id[k])
        for j_idx, j in enumerate(c["rows"]):
            cell = c["matrix"][j_idx][k_idx]
            if j > k or j not in by_id[k].active_ids:
                assert cell is None, (j, k)
                continue
            e = by_id[j]
            ok = target_scores(w.lm.model, w.lm.tokenizer, list(e.inputs), list(e.targets), w.fmt)[0]
            assert cell == sum(ok) / len(ok), (j, k)
    assert c["matrix"][0][0] == 1.0 and c["matrix"][2][2] == 1.0
    assert c["cost"]["cells_from_ledger"] == 3  # each edit's own success right after it
    assert c["cost"]["cells_computed"] == c["cost"]["cells"] - 3

    record_audit(w, r)
    again = run_audit(w)
    assert again["chain"]["matrix"] == c["matrix"]
    assert again["chain"]["cost"]["cells_computed"] == 0
    assert again["chain"]["cost"]["states_rebuilt"] == 0
    assert [s["audit_locality"] for s in again["chain"]["series"]] == \
        [s["audit_locality"] for s in c["series"]]


def test_cli_audit_report_matches_json_and_checks_exit_2(chain, tmp_path):
    ws = clone_workspace(chain.ws, tmp_path / "ws")
    rep = tmp_path / "report"
    r = ws.run("audit", "--report", rep, "--json", "--fail-under", "edit_retention=1.01",
               "--fail-over", "audit_kl=0")
    assert r.returncode == 2, str(r)
    out = r.json()
    assert "check failed: edit_retention" in r.stderr and "audit_kl" in r.stderr
    assert len(out["checks_failed"]) == 2
    for name in ("report.html", "report.md", "audit.json", "retention.png", "chain.png"):
        assert (rep / name).is_file() and (rep / name).stat().st_size > 0, name
    saved = json.loads((rep / "audit.json").read_text())
    assert saved["summary"] == out["summary"]
    assert saved["edits"] == out["edits"]
    assert saved["chain"]["matrix"] == out["chain"]["matrix"]
    page = (rep / "report.html").read_text()
    assert "data:image/png;base64," in page  # self-contained
    for key in ("edit_retention", "audit_locality", "relative_drift"):
        assert f"<td>{key}</td><td>{out['summary'][key]:.4f}</td>" in page
    md = (rep / "report.md").read_text()
    assert f"| audit_locality | {out['summary']['audit_locality']:.4f} |" in md

    log = ws.ok("log", "--json").json()
    assert {e["id"]: e["audited"] for e in log} == {1: False, 2: False, 3: True}

    ok = ws.run("audit", "--fail-under", "audit_locality=0", "--no-matrix")
    assert ok.returncode == 0, str(ok)
    assert "audit 2 of state 3 (3 active edits)" in ok.stdout


@pytest.mark.parametrize("args, words", [
    (["--fail-under", "nope=1"], "KEY=VALUE with KEY one of"),
    (["--fail-under", "edit_retention=high"], "is not a number"),
    (["--fail-over", "edit_retention=0.5"], "KEY=VALUE with KEY one of"),
    (["--range", "3..1"], "comes after"),
    (["--range", "1..99"], "no entry 99"),
])
def test_cli_audit_bad_input_records_nothing(chain, tmp_path, args, words):
    import sqlite3

    ws = clone_workspace(chain.ws, tmp_path / "ws")
    msg = one_line_error(ws.run("audit", *args))
    assert words in msg
    con = sqlite3.connect(ws.ledger_path)
    try:
        assert con.execute("select count(*) from audits").fetchone()[0] == 0
    finally:
        con.close()


def test_parse_range():
    from mendctl.audit import parse_range

    assert parse_range("3..10") == (3, 10)
    assert parse_range("3..") == (3, None)
    assert parse_range("..4") == (None, 4)
    assert parse_range("7") == (7, 7)
    assert parse_range(None) == (None, None)
