"""End-to-end tests of the `mendctl` command line on a tiny offline Llama model.

Every command runs in a workspace wired to a tiny model and an untrained MEND editor built
once per session (tests/e2e_helpers.py), and the tests check what lands on disk: the ledger,
the delta files, exports. Commands run in this process (click's CliRunner) unless a test is
marked `subprocess`: the whole flows below run a second time as real `python -m mendctl`
processes in the full suite (`pytest --full`), and the crash test kills real processes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import (CHAIN, Ws, chain, clone_workspace, cli_cmd, cli_env,  # noqa: E402,F401
                         fresh_ws, init_workspace_inprocess, one_line_error, run_cli,
                         sha256_file, tiny_assets)
from mendctl.edit import edit  # noqa: E402


def _commands():
    import click

    from mendctl.cli import main

    def walk(group, prefix=()):
        for name, cmd in group.commands.items():
            yield prefix + (name,)
            if isinstance(cmd, click.Group):
                yield from walk(cmd, prefix + (name,))
    return list(walk(main))


# A whole flow run twice: in this process (quick suite) and as real `python -m mendctl`
# processes (full suite only; tests/conftest.py switches e2e_helpers.REAL_PROCESS on).
IN_AND_OUT_OF_PROCESS = pytest.mark.parametrize(
    "process", ["in-process", pytest.param("subprocess", marks=pytest.mark.subprocess)])


def _wal_free(files: set[str]) -> set[str]:
    return {f for f in files if not f.endswith(("-wal", "-shm", "-journal"))}


# -- help -----------------------------------------------------------------------------------------
@IN_AND_OUT_OF_PROCESS
def test_help_lists_every_command_and_each_has_an_example(tmp_path, process):
    commands = _commands()
    top = {c[0] for c in commands}
    assert {"init", "edit", "ask", "log", "show", "revert", "replay", "export", "verify",
            "gc", "audit", "squash", "train", "eval"} <= top
    r = run_cli("--help", cwd=tmp_path, cache_dir=tmp_path)
    assert r.returncode == 0, str(r)
    assert "Example" in r.stdout
    listed = r.stdout.split("Commands:", 1)[1]
    for name in top:
        assert f"  {name} " in listed or f"  {name}\n" in listed, f"{name} missing from --help"
    for cmd in commands:
        r = run_cli(*cmd, "--help", cwd=tmp_path, cache_dir=tmp_path)
        assert r.returncode == 0, str(r)
        assert "Example" in r.stdout, f"`mendctl {' '.join(cmd)} --help` has no example"
    assert list(tmp_path.iterdir()) == []  # help writes nothing


def test_in_process_runs_keep_a_bug_a_traceback(fresh_ws: Ws, monkeypatch):
    """The in-process runner (tests/e2e_helpers.py) reports an uncaught exception as Python
    would (exit 1, the traceback on stderr), so `one_line_error` still tells a bug from a
    user error; and it leaves this process's directory, argv and environment as they were."""
    from mendctl.workspace import Workspace

    def broken(*a, **kw):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(Workspace, "open", broken)
    cwd, argv, env = os.getcwd(), list(sys.argv), dict(os.environ)
    r = fresh_ws.run("log")
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: a bug" in r.stderr, str(r)
    with pytest.raises(AssertionError):
        one_line_error(r)
    assert (os.getcwd(), sys.argv, dict(os.environ)) == (cwd, argv, env)


# -- bad set-ups, as a new user makes them ---------------------------------------------------------
def test_no_workspace_says_mendctl_init_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cache = tmp_path / "cache"
    r = run_cli("log", cwd=empty, cache_dir=cache)
    msg = one_line_error(r)
    assert "mendctl init" in msg and "mendctl.yaml" in msg
    assert list(empty.iterdir()) == []


def test_workspace_option_pointing_to_a_dir_without_config(tmp_path):
    elsewhere = tmp_path / "not-a-workspace"
    elsewhere.mkdir()
    here = tmp_path / "here"
    here.mkdir()
    r = run_cli("--workspace", elsewhere, "log", cwd=here, cache_dir=tmp_path / "cache")
    msg = one_line_error(r)
    assert "--workspace" in msg and str(elsewhere) in msg and "mendctl init" in msg
    assert list(elsewhere.iterdir()) == [] and list(here.iterdir()) == []


BAD_CONFIGS = {
    # name: (yaml text appended/replacing, command, words the one-line message must contain)
    "unknown-key": ("colour: blue\n", ["log"], ["unknown key", "colour", "mendctl.yaml"]),
    "wrong-type": ("lock_timeout: soon\n", ["log"], ["lock_timeout", "mendctl.yaml", "str"]),
    "bad-yaml": ("model: [unclosed\n", ["log"], ["not valid YAML", "line", "mendctl.yaml"]),
    "bad-value": ("dtype: float8\n", ["log"], ["dtype", "float8", "mendctl.yaml"]),
    "unknown-model": ("model: nosuchmodel\n", ["edit", "--input", "a b", "--target", "c"],
                      ["nosuchmodel", "unknown model"]),
}


BAD_CONFIGS["unknown-model-ask"] = ("model: nosuchmodel\n", ["ask", "--input", "a b"],
                                    ["nosuchmodel", "unknown model"])


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_clear_line_and_no_ledger(case, tiny_assets, tmp_path):
    text, args, words = BAD_CONFIGS[case]
    cache = tmp_path / "cache"
    ws = init_workspace_inprocess(tmp_path / "ws", tiny_assets, cache)
    cfg = ws.root / "mendctl.yaml"
    key = text.split(":")[0]
    kept = [l for l in cfg.read_text().splitlines(keepends=True) if not l.startswith(key + ":")]
    cfg.write_text("".join(kept) + text)
    before = ws.all_files()
    r = ws.run(*args)
    msg = one_line_error(r)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    if "mendctl.yaml" in words:
        assert str(cfg) in msg  # names the file, with its path
    assert not ws.ledger_path.exists()
    assert ws.all_files() == before


# -- the edit flow --------------------------------------------------------------------------------
@IN_AND_OUT_OF_PROCESS
def test_edit_log_show_ask_and_dry_run(fresh_ws: Ws, process):
    ws = fresh_ws
    x, y = "The capital of France is", "Rome"
    r = ws.ok("edit", "--input", x, "--target", y, "--json")
    rep = r.json()
    assert rep["entry"] == 1 and rep["dry_run"] is False
    b, a = rep["before"], rep["after"]
    assert a["target_logprob"][0] > b["target_logprob"][0] + 1.0, rep  # the edit did something
    # chain health: the state before the first edit is the base model itself
    assert b["health"]["audit_locality"] == 1.0 and b["health"]["relative_drift"] == 0.0
    assert 0.0 <= a["health"]["audit_locality"] <= 1.0 and a["health"]["relative_drift"] > 0.0

    log = ws.ok("log", "--json").json()
    assert len(log) == 1
    e = log[0]
    assert e["kind"] == "edit" and e["id"] == 1 and e["parent_id"] is None
    assert e["inputs"] == [x] and e["targets"] == [y]
    assert len(e["delta_sha256"]) == 64 and len(e["state_hash"]) == 64
    assert e["state_hash"] == rep["state_hash"] and e["active_ids"] == [1] and e["active"]
    f = ws.delta_path(e["delta_sha256"])
    assert f.is_file() and f.parent.parent == ws.objects_dir
    assert sha256_file(f) == e["delta_sha256"]
    assert f.stat().st_size == e["delta_size"]
    assert ws.delta_files() == [f]

    shown = ws.ok("show", "1", "--json").json()
    assert shown["id"] == 1 and shown["delta_sha256"] == e["delta_sha256"]
    assert shown["state_hash"] == e["state_hash"] and shown["command"].startswith("mendctl edit")

    # the state after entry 1 answers what the edit reported (same greedy length as the edit's)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ws.assets.model_dir))
    n = max(8, len(tok(y).input_ids) + 4)  # what `edit` generates for its report
    ans = ws.ok("ask", "--input", x, "--at", "1", "--max-new-tokens", n, "--json").json()
    assert ans["state"] == 1 and ans["state_hash"] == e["state_hash"]
    assert [q["input"] for q in ans["answers"]] == [x]
    assert ans["answers"][0]["answer"] == a["answers"][0]

    files = _wal_free(ws.all_files())
    d = ws.ok("edit", "--input", "Water boils at", "--target", "fifty", "--dry-run", "--json").json()
    assert d["dry_run"] is True and "entry" not in d
    assert ws.ledger_count() == 1
    assert _wal_free(ws.all_files()) == files
    assert ws.delta_files() == [f]


# -- bad edit input -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--input", "", "--target", "Rome"], ["empty"]),
    (["--input", "   ", "--target", "Rome"], ["empty"]),
    (["--input", "The capital of France is", "--target", " \t "], ["empty"]),
    (["--input", "The capital of France is"], ["--target"]),
])
def test_empty_edit_input_is_refused(args, words, fresh_ws: Ws):
    ws = fresh_ws
    r = ws.run("edit", *args)
    msg = one_line_error(r)
    for w in words:
        assert w in msg
    assert ws.ledger_count() == 0 and ws.delta_files() == []
    assert not ws.tmp_dir.exists() or list(ws.tmp_dir.iterdir()) == []


def test_batch_with_a_malformed_line_applies_nothing(fresh_ws: Ws):
    ws = fresh_ws
    batch = ws.root / "facts.jsonl"
    batch.write_text(json.dumps({"input": "The capital of France is", "target": "Rome"}) + "\n"
                     + json.dumps({"input": "Water boils at", "target": "fifty"}) + "\n"
                     + '{"input": "The Eiffel Tower is in", "target": \n'
                     + json.dumps({"input": "a", "target": "b"}) + "\n")
    r = ws.run("edit", "--batch", batch)
    msg = one_line_error(r)
    assert "facts.jsonl:3:" in msg  # path:line, as compilers write it
    # a record with a blank target, on line 2
    batch.write_text(json.dumps({"input": "The capital of France is", "target": "Rome"}) + "\n"
                     + json.dumps({"input": "Water boils at", "target": "  "}) + "\n")
    msg = one_line_error(ws.run("edit", "--batch", batch))
    assert "facts.jsonl:2:" in msg
    assert ws.ledger_count() == 0 and ws.delta_files() == []
    assert not ws.tmp_dir.exists() or list(ws.tmp_dir.iterdir()) == []


def test_ledger_from_a_newer_schema_is_refused(fresh_ws: Ws):
    from mendctl.ledger import Ledger

    ws = fresh_ws
    Ledger(ws.ledger_path).open().close()
    con = sqlite3.connect(ws.ledger_path)
    with con:
        con.execute("update alembic_version set version_num = '9999_future'")
    con.close()
    msg = one_line_error(ws.run("log"))
    assert "newer" in msg and "9999_future" in msg and "upgrade mendctl" in msg
    con = sqlite3.connect(ws.ledger_path)
    assert con.execute("select version_num from alembic_version").fetchall() == [("9999_future",)]
    assert con.execute("select count(*) from entries").fetchone()[0] == 0
    con.close()
    assert ws.delta_files() == []


# -- revert and replay ----------------------------------------------------------------------------
def test_exact_revert_of_an_earlier_edit_writes_no_delta(chain, tmp_path):
    """An exact revert with later edits recomputes them only to measure the gap: it records
    one entry and no delta file (no orphan for `verify` to report)."""
    ws = clone_workspace(chain.ws, tmp_path / "ws")
    files = set(ws.delta_files())
    r = ws.ok("revert", "1", "--json").json()
    assert r["mode"] == "exact" and r["entries"] == [4] and r["gap"]["later_edits"] == 2
    assert set(ws.delta_files()) == files
    v = ws.ok("verify", "--json").json()
    assert v["ok"] and v["orphans"] == []


@IN_AND_OUT_OF_PROCESS
def test_revert_exact_then_by_replay_and_replay_verify(chain, tmp_path, process):
    ws = clone_workspace(chain.ws, tmp_path / "ws")
    e2, e3 = chain.entry(2), chain.entry(3)
    assert e3["parent_id"] == 2

    msg = one_line_error(ws.run("show", "99"))
    assert "no entry 99" in msg
    msg = one_line_error(ws.run("revert", "99"))
    assert "no entry 99" in msg
    assert ws.ledger_count() == 3

    r = ws.ok("revert", "3", "--json").json()
    assert r["mode"] == "exact" and r["entries"] == [4]
    assert r["state_hash"] == e2["state_hash"]  # bit for bit the parent's state
    assert r["restores_parent"] is True

    msg = one_line_error(ws.run("revert", "3"))
    assert "not active" in msg and "reverted by entry 4" in msg
    assert ws.ledger_count() == 4

    files_before = set(ws.delta_files())
    r = ws.ok("revert", "1", "--replay", "--json").json()
    assert r["mode"] == "replay" and r["entries"] == [5, 6] and r["later_edits"] == [2]
    assert r["gap"]["later_edits"] == 1

    log = sorted(ws.ok("log", "--json").json(), key=lambda e: e["id"])
    by_id = {e["id"]: e for e in log}
    assert [e["kind"] for e in log] == ["edit", "edit", "edit", "revert", "revert", "replay"]
    assert by_id[4]["reverts_id"] == 3 and by_id[4]["state_hash"] == e2["state_hash"]
    assert by_id[4]["active_ids"] == [1, 2]
    assert by_id[5]["reverts_id"] == 1 and by_id[5]["active_ids"] == []
    assert by_id[6]["replay_of_id"] == 2 and by_id[6]["active_ids"] == [6]
    assert by_id[6]["parent_id"] == 5 and by_id[6]["state_hash"] == r["state_hash"]
    assert by_id[6]["inputs"] == [CHAIN[1][0]] and by_id[6]["targets"] == [CHAIN[1][1]]
    new = set(ws.delta_files()) - files_before
    assert [p.name for p in new] == [by_id[6]["delta_sha256"] + ".safetensors"]
    assert sha256_file(next(iter(new))) == by_id[6]["delta_sha256"]

    r = ws.run("replay", "--verify")
    assert r.returncode == 0, str(r)
    assert "6/6 states rebuilt" in r.stdout and "match" in r.stdout


# -- corruption -----------------------------------------------------------------------------------
def test_verify_finds_corruption_and_gc_removes_only_orphans(chain, tmp_path):
    ws = clone_workspace(chain.ws, tmp_path / "ws")
    shas = {i: chain.entry(i)["delta_sha256"] for i in (1, 2, 3)}
    p1, p2, p3 = (ws.delta_path(shas[i]) for i in (1, 2, 3))
    good2, good3 = p2.read_bytes(), p3.read_bytes()

    data = bytearray(good2)
    data[len(data) // 2] ^= 0xFF  # flip a byte in the tensor data
    p2.write_bytes(bytes(data))
    p3.write_bytes(good3[: len(good3) // 3])  # truncated
    fake = "ab" * 32  # a valid-looking name no entry refers to
    orphan = ws.objects_dir / fake[:2] / f"{fake}.safetensors"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(p1, orphan)
    ws.tmp_dir.mkdir(parents=True, exist_ok=True)
    leftover = ws.tmp_dir / "0123456789ab.xyz.safetensors.tmp"
    leftover.write_bytes(b"half an edit")

    r = ws.run("verify")
    assert r.returncode == 1, str(r)
    lines = r.stdout.splitlines()
    assert any(l.strip().startswith("entry 2:") and "corrupted" in l for l in lines), r.stdout
    assert any(l.strip().startswith("entry 3:") and "corrupted" in l for l in lines), r.stdout
    assert any(l.strip().startswith("entry 3:") and "cannot be read" in l for l in lines), r.stdout
    assert not any(l.strip().startswith("entry 1:") for l in lines), r.stdout
    assert any("orphan" in l and str(orphan) in l for l in lines), r.stdout
    assert any("orphan" in l and str(leftover) in l for l in lines), r.stdout

    r = ws.ok("gc")
    assert "removed 2 orphan file(s)" in r.stdout
    assert not orphan.exists() and not leftover.exists()
    assert p1.is_file() and p2.is_file() and p3.is_file()  # damaged but referenced: kept

    p2.write_bytes(good2)
    p3.write_bytes(good3)
    r = ws.ok("verify")
    assert "3 entries: ok" in r.stdout


# -- another base model ---------------------------------------------------------------------------
def test_workspace_opened_with_another_base_model(chain, tmp_path):
    ws = clone_workspace(chain.ws, tmp_path / "ws")
    ws.write_config(model=str(ws.assets.model2_dir))
    r = ws.run("ask", "--input", "The capital of France is")
    msg = one_line_error(r)
    assert "base model" in msg and "replay --onto-model" in msg
    assert str(ws.assets.model_dir.resolve()) in msg  # says which model to put back
    assert ws.ledger_count() == 3


# -- the lock -------------------------------------------------------------------------------------
def test_edit_waits_for_the_lock_and_names_the_holder(fresh_ws: Ws):
    from mendctl.locking import WorkspaceLock

    ws = fresh_ws
    ws.write_config(lock_timeout=1)
    with WorkspaceLock(ws.state_dir / "lock", timeout=0, command="pytest holding the lock"):
        r = ws.run("edit", "--input", "The capital of France is", "--target", "Rome")
    msg = one_line_error(r)
    assert "locked" in msg and f"process {os.getpid()} " in msg
    assert "pytest holding the lock" in msg
    assert ws.ledger_count() == 0 and ws.delta_files() == []


# -- export ---------------------------------------------------------------------------------------
def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_export_hf_and_peft_match_the_edited_state(chain, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mendctl.workspace import Workspace

    ws = clone_workspace(chain.ws, tmp_path / "ws")
    hf_dir, peft_dir = tmp_path / "hf", tmp_path / "peft"
    ws.ok("export", "--out", hf_dir, "--format", "hf")
    ws.ok("export", "--out", peft_dir, "--format", "peft")
    meta = json.loads((hf_dir / "mendctl-export.json").read_text())
    assert meta["entry"] == 3 and meta["state_hash"] == chain.entry(3)["state_hash"]

    tok = AutoTokenizer.from_pretrained(str(ws.assets.model_dir))
    ids = tok(["The capital of France is Rome. Water boils at"], return_tensors="pt").input_ids

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    hf_logits = _logits(hf, ids)

    w = Workspace.open(str(ws.root))
    try:
        w.use_state(w.head())
        ref_logits = _logits(w.lm.model, ids)
        w.use_state(None)
        base_logits = _logits(w.lm.model, ids)
    finally:
        w.ledger.close()
    # Tolerances relative to the logits' size: the export holds the state's float32 tensors,
    # so the same forward gives the same logits up to kernel choice, a few eps32 × max |logit|
    # (measured: identical; 64 eps32 allowed)
    eps, scale = torch.finfo(torch.float32).eps, float(ref_logits.abs().max())
    err = float((hf_logits - ref_logits).abs().max())
    assert err <= 64 * eps * scale, (err, scale)
    assert (hf_logits - base_logits).abs().max() > 1e-2  # the export holds the edits

    base = AutoModelForCausalLM.from_pretrained(str(ws.assets.model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base.eval(), str(peft_dir)).eval()
    peft_logits = _logits(peft_model, ids)
    # PEFT computes W·x + B·(A·x) instead of (W + BA)·x: other float32 sums, through 4 blocks
    # (measured 3 eps32 × max |logit|; 512 allowed, ~1e-4 here; a missing edit moves them > 1e-2)
    err = float((peft_logits - hf_logits).abs().max())
    assert err <= 512 * eps * scale, (err, scale)

    msg = one_line_error(ws.run("export", "--out", hf_dir))
    assert "not empty" in msg


# -- crash safety ---------------------------------------------------------------------------------
@pytest.mark.subprocess
def test_sigkill_during_edit_leaves_every_edit_whole_or_absent(chain, tmp_path):
    ws = clone_workspace(chain.ws, tmp_path / "ws")
    env = cli_env(ws.cache_dir)

    def start(i):
        return subprocess.Popen(cli_cmd("edit", "--input", f"Crash test number {i} is",
                                        "--target", f"answer {i}"),
                                cwd=str(ws.root), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    t0 = time.perf_counter()
    p = start(0)
    _, err = p.communicate(timeout=120)
    duration = time.perf_counter() - t0
    assert p.returncode == 0, err

    rng = random.Random(20240611)
    runs = 10
    delays = [rng.uniform(0.05, 1.05) * duration for _ in range(runs)]
    outcomes = []
    for i, delay in enumerate(delays, start=1):
        p = start(i)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        outcomes.append(p.returncode)
        assert p.returncode in (0, -signal.SIGKILL), err
    assert outcomes.count(-signal.SIGKILL) >= runs // 2, (outcomes, delays, duration)

    con = sqlite3.connect(ws.ledger_path)  # the ledger itself, read without mendctl
    con.row_factory = sqlite3.Row
    log = [dict(r) for r in con.execute("select * from entries order by id")]
    con.close()
    for e in log:
        e["inputs"], e["active_ids"] = json.loads(e["inputs"]), json.loads(e["active_ids"])
    crash = [e for e in log if e["id"] > 3]
    completed = {i for i, rc in enumerate(outcomes, start=1) if rc == 0} | {0}
    recorded = {int(e["inputs"][0].split()[3]) for e in crash}
    assert completed <= recorded  # every finished edit is recorded...
    assert len(recorded) == len(crash)  # ...once
    for e in log:  # ...and whole
        assert e["kind"] == "edit"
        f = ws.delta_path(e["delta_sha256"])
        assert f.is_file() and sha256_file(f) == e["delta_sha256"], e["id"]
        i = e["id"]
        assert e["active_ids"] == list(range(1, i + 1))
        assert e["parent_id"] == (i - 1 if i > 1 else None)

    r = ws.run("verify")
    problems = [l.strip() for l in r.stdout.splitlines()[1:] if l.strip()]
    assert all(p.startswith("orphan file") for p in problems), r.stdout
    assert r.returncode == (1 if problems else 0), str(r)
    ws.ok("gc")
    r = ws.ok("verify")
    assert f"{len(log)} entries: ok" in r.stdout
    r = ws.run("replay", "--verify")
    assert r.returncode == 0, str(r)
    assert f"{len(log)}/{len(log)} states rebuilt" in r.stdout
    # A killed run may leave a temp file outside the store: a state-cache file being written
    # (the next state-cache write sweeps it) or the lock's holder side file being replaced.
    # Nothing may be left in the store (gc cleaned it) nor anywhere else.
    leftovers = [p for p in ws.state_dir.rglob("*") if p.is_file() and ".tmp" in p.name]
    allowed = [p for p in leftovers if p.parent == ws.state_dir / "states"
               or (p.parent == ws.state_dir and p.name.startswith("lock.holder.json."))]
    assert leftovers == allowed, leftovers


def test_non_finite_delta_is_refused_before_anything_is_recorded(fresh_ws, monkeypatch):
    """An editor that returns NaN (a broken checkpoint) must leave no row and no file."""
    from mendctl.editors.data import EditCase
    from mendctl.editors.mend.editor import MendEditor
    from mendctl.errors import EditorError
    from mendctl.workspace import Workspace

    real_edit = MendEditor.edit

    def nan_edit(self, *a, **kw):
        d = real_edit(self, *a, **kw)
        next(iter(d.layers.values())).u[0, 0] = float("nan")
        return d

    monkeypatch.setattr(MendEditor, "edit", nan_edit)
    monkeypatch.setenv("MENDCTL_CACHE", str(fresh_ws.cache_dir))
    ws = Workspace.open(str(fresh_ws.root))
    with pytest.raises(EditorError, match="non-finite"):
        edit(ws, [EditCase(input="a b", target="c")])
    assert fresh_ws.ledger_count() == 0
    assert fresh_ws.delta_files() == []
    assert not fresh_ws.tmp_dir.exists() or not any(fresh_ws.tmp_dir.iterdir())


# -- drift guard ------------------------------------------------------------------------------------
def test_drift_guard_scales_big_edits_and_replay_reproduces_them(tiny_assets, tmp_path):
    """With `guard_norm`, an edit larger than guard_norm × the editor's reference size is
    recorded scaled down to that size, the limit is recorded with it, and replay rebuilds
    the same states even after the configuration changed."""
    ed_dir = tmp_path / "editor"
    shutil.copytree(tiny_assets.editor_dir, ed_dir)
    doc = json.loads((ed_dir / "editor.json").read_text())
    doc["delta_norm_reference"] = {"median": 1e-4, "p90": 1e-4, "max": 1e-4, "cases": 1}
    (ed_dir / "editor.json").write_text(json.dumps(doc))
    cache = tmp_path / "cache"
    cache.mkdir()
    ws = init_workspace_inprocess(tmp_path / "ws", tiny_assets, cache)
    ws.write_config(editor=str(ed_dir), guard_norm=2.0)
    r = ws.ok("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1], "--max-steps", "1", "--json").json()
    assert r["guard"]["max_norm"] == pytest.approx(2e-4)
    assert 0 < r["guard"]["norm_scale"] < 1
    assert sum(v * v for v in r["delta_norms"].values()) ** 0.5 == pytest.approx(2e-4, rel=1e-4)
    human = ws.ok("edit", "--input", CHAIN[1][0], "--target", CHAIN[1][1])
    assert "drift guard: a step's ΔW scaled by" in human.stdout
    facts = ws.root / "four.jsonl"  # a batched edit of n facts may be √n times larger
    facts.write_text("".join(json.dumps({"input": f"Fact number {i} is", "target": f"value {i}"}) + "\n"
                             for i in range(4)))
    rb = ws.ok("edit", "--batch", facts, "--max-steps", "1", "--json").json()
    assert rb["guard"]["max_norm"] == pytest.approx(4e-4)
    ws.write_config(guard_norm=None)  # later edits unguarded; replay keeps the recorded limits
    r3 = ws.ok("edit", "--input", CHAIN[2][0], "--target", CHAIN[2][1], "--json").json()
    assert r3["guard"] == {"max_norm": None, "norm_scale": None}
    shown = ws.ok("show", "1", "--json").json()
    assert shown["notes"]["policy"]["max_norm"] == pytest.approx(2e-4)
    assert 0 < shown["notes"]["norm_scale"] < 1
    r = ws.run("replay", "--verify")
    assert r.returncode == 0, str(r)
    assert "4/4 states rebuilt" in r.stdout


def test_retention_guard_is_recorded_replayed_and_can_be_turned_off(tiny_assets, tmp_path):
    """`protect_edits` (on by default): each MEND edit is kept off the keys of the chain's
    active edits; how many and the subspace's size are reported and recorded, a revert by
    replay re-runs later edits guarded over the edits active then, and `protect_edits: false`
    edits without it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    ws = init_workspace_inprocess(tmp_path / "ws", tiny_assets, cache)
    r1 = ws.ok("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1], "--json").json()
    assert r1["protect"] == {"on": True, "pairs": 0, "rank": None}
    r2 = ws.ok("edit", "--input", CHAIN[1][0], "--target", CHAIN[1][1], "--json").json()
    assert r2["protect"]["on"] and r2["protect"]["pairs"] == 1 and r2["protect"]["rank"] >= 1
    human = ws.ok("edit", "--input", CHAIN[2][0], "--target", CHAIN[2][1])
    assert "retention guard: update kept off the keys of 2 earlier edits" in human.stdout
    notes = ws.ok("show", "3", "--json").json()["notes"]
    assert notes["policy"]["protect"] is True and notes["protected_pairs"] == 2 and notes["protected_rank"] >= 1
    r = ws.ok("revert", "1", "--replay", "--json").json()
    replayed = [ws.ok("show", str(i), "--json").json() for i in r["entries"][1:]]
    assert [e["notes"]["policy"]["protect"] for e in replayed] == [True, True]
    assert [e["notes"]["replay_of"] for e in replayed] == [2, 3]
    ws.write_config(protect_edits=False)
    r4 = ws.ok("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1], "--json").json()
    assert r4["protect"] == {"on": False, "pairs": 0, "rank": None}
    assert ws.ok("show", str(r4["entry"]), "--json").json()["notes"]["policy"]["protect"] is False
    r = ws.run("replay", "--verify")
    assert r.returncode == 0, str(r)


def test_protect_edits_must_be_true_or_false(fresh_ws):
    fresh_ws.write_config(protect_edits="yes")
    r = fresh_ws.run("log")
    assert r.returncode != 0 and "protect_edits" in r.stderr and "bool" in r.stderr


@pytest.mark.parametrize("key, value, words", [
    ("step_factor", 0, "number > 0"), ("max_steps", 0, "1 to 50"), ("max_steps", 51, "1 to 50"),
    ("max_steps", 2.5, "int"), ("preserve_keys", 1.5, "between 0 and 1"),
    ("preserve_keys", "yes", "float"),
])
def test_step_and_preserve_settings_are_checked(fresh_ws, key, value, words):
    fresh_ws.write_config(**{key: value})
    r = fresh_ws.run("log")
    assert r.returncode != 0 and key in r.stderr and words in r.stderr, r.stderr


def test_small_steps_and_preserved_keys_are_recorded_and_replayed(tiny_assets, tmp_path):
    """By default MEND edits take steps of `step_factor` × the editor's α, kept off the
    preserved-key subspace (computed once per workspace, cached); both are reported and
    recorded, replay re-runs every edit as recorded even after the settings changed, and
    `preserve_keys: null` / `step_factor: 1` turn them off."""
    cache = tmp_path / "cache"
    cache.mkdir()
    ws = init_workspace_inprocess(tmp_path / "ws", tiny_assets, cache)
    r1 = ws.ok("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1], "--json").json()
    assert r1["step_factor"] == 0.5 and r1["preserve"]["cut"] == 0.01 and r1["preserve"]["rank"] >= 1
    assert len(list((ws.root / ".mendctl" / "preserve").glob("*.safetensors"))) == 1
    human = ws.ok("edit", "--input", CHAIN[1][0], "--target", CHAIN[1][1])
    assert "of α × 0.5" in human.stdout and "preserved keys: update kept off" in human.stdout
    policy = ws.ok("show", "2", "--json").json()["notes"]["policy"]
    assert (policy["step_factor"], policy["preserve_keys"], policy["max_steps"]) == (0.5, 0.01, 20)
    ws.write_config(step_factor=1, preserve_keys=None)
    r3 = ws.ok("edit", "--input", CHAIN[2][0], "--target", CHAIN[2][1], "--json").json()
    assert r3["step_factor"] == 1.0 and r3["preserve"] == {"cut": None, "rank": None}
    r = ws.run("replay", "--verify")
    assert r.returncode == 0 and "3/3 states rebuilt" in r.stdout, str(r)
    r = ws.ok("revert", "1", "--replay", "--json").json()
    replayed = [ws.ok("show", str(i), "--json").json()["notes"]["policy"] for i in r["entries"][1:]]
    assert [(n["step_factor"], n["preserve_keys"]) for n in replayed] == [(0.5, 0.01), (1.0, None)]


def test_guard_norm_must_be_positive(fresh_ws):
    fresh_ws.write_config(guard_norm=0)
    r = fresh_ws.run("log")
    assert r.returncode != 0 and "guard_norm" in r.stderr and "null" in r.stderr


def test_calibrate_chooses_the_operating_point_on_validation(tiny_assets, tmp_path):
    """`mendctl calibrate` sweeps a factor on the editor's α over validation edits, applies the
    one with the best edit success among those whose locality reaches the target, records the
    sweep and re-measures the drift guard's yardstick; a bad target is refused with nothing
    written. With --max-steps N the sweep is over edits of up to N steps, and `eval` then makes
    N-step edits by default."""
    from safetensors.torch import load_file

    ed_dir = tmp_path / "editor"
    shutil.copytree(tiny_assets.editor_dir, ed_dir)
    cache = tmp_path / "cache"
    cache.mkdir()
    ws = init_workspace_inprocess(tmp_path / "ws", tiny_assets, cache)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"input": p, "target": t, "paraphrases": [p.replace("is", "was")],
                                       "locality": ["The weather today is", "My favourite colour is"]}) + "\n"
                           for p, t in CHAIN[:3]))
    before_json = (ed_dir / "editor.json").read_text()
    before = load_file(str(ed_dir / "editor.safetensors"))
    bad = ws.run("calibrate", ed_dir, "--locality-target", "1.5", "--val-data", val)
    assert bad.returncode != 0 and "between 0 and 1" in bad.stderr
    assert (ed_dir / "editor.json").read_text() == before_json

    r = ws.ok("calibrate", ed_dir, "--locality-target", "0.9", "--val-data", val, "--json",
              timeout=600).json()
    sweep = r["sweep"]
    assert [x["scale"] for x in sweep] == sorted(x["scale"] for x in sweep) and len(sweep) >= 8
    # the untrained tiny editor moves the model too much for locality 0.9 at every scale
    # (measured: locality ≤ 0.05), so the target is not reached: the most local point is
    # chosen (ties: the smallest step); `--locality-target 0` below reaches it
    assert not any(x["locality"] >= 0.9 for x in sweep) and r["reached"] is False, sweep
    assert r["alpha_factor"] == max(sweep, key=lambda x: (x["locality"], -x["scale"]))["scale"]
    assert r["max_steps"] == 1
    assert r["cases"] == 3 and r["chosen"]["scale"] == r["alpha_factor"]
    after = load_file(str(ed_dir / "editor.safetensors"))
    assert torch.allclose(after["alpha"], before["alpha"] * r["alpha_factor"])
    for k in before:  # only the steps change
        if k != "alpha":
            assert torch.equal(after[k], before[k]), k
    doc = json.loads((ed_dir / "editor.json").read_text())
    assert doc["operating_point"]["alpha_factor"] == r["alpha_factor"]
    assert doc["delta_norm_reference"]["cases"] == 3
    human = ws.ok("calibrate", ed_dir, "--locality-target", "0.9", "--val-data", val, timeout=600)
    assert "<- chosen" in human.stdout and "α multiplied by" in human.stdout
    # an editor whose steps are 10⁴ times smaller leaves the answers alone: the target is
    # reached, and the point with the best edit success, then the largest step, is chosen
    from safetensors.torch import save_file

    small_dir = tmp_path / "small-editor"
    shutil.copytree(tiny_assets.editor_dir, small_dir)
    small = load_file(str(small_dir / "editor.safetensors"))
    small["alpha"] = small["alpha"] * 1e-4
    save_file(small, str(small_dir / "editor.safetensors"))
    doc = json.loads((small_dir / "editor.json").read_text())  # its recorded hash follows
    doc["weights_sha256"] = sha256_file(small_dir / "editor.safetensors")
    (small_dir / "editor.json").write_text(json.dumps(doc))
    r = ws.ok("calibrate", small_dir, "--locality-target", "0.9", "--val-data", val, "--json",
              timeout=600).json()
    reached = [x for x in r["sweep"] if x["locality"] >= 0.9]
    assert r["reached"] is True and reached, r["sweep"]
    assert r["alpha_factor"] == max(reached, key=lambda x: (x["edit_success"], x["scale"]))["scale"]

    r = ws.ok("calibrate", ed_dir, "--locality-target", "0.9", "--val-data", val, "--json",
              "--max-steps", "3", timeout=600).json()
    assert r["max_steps"] == 3 and all(x["max_steps"] == 3 and 1 <= x["steps"] <= 3 for x in r["sweep"])
    assert min(x["scale"] for x in r["sweep"]) < 0.4  # smaller steps are tried
    doc = json.loads((ed_dir / "editor.json").read_text())
    assert doc["operating_point"]["max_steps"] == 3
    ws.write_config(editor=str(ed_dir))
    ev = ws.ok("eval", "--data", val, "--json", timeout=600).json()["summary"]
    assert ev["max_steps"] == 20  # mendctl.yaml's max_steps comes first
    ws.write_config(editor=str(ed_dir), max_steps=None)
    ev = ws.ok("eval", "--data", val, "--json", timeout=600).json()["summary"]
    assert ev["max_steps"] == 3  # then the editor's operating point, not the paper's single step
    assert ws.ok("eval", "--data", val, "--json", "--max-steps", "1",
                 timeout=600).json()["summary"]["max_steps"] == 1
