"""Regression tests for the defects an adversarial run found (issue 20): bad input, hostile
model and editor directories, a missing or wrong ledger, huge ids, read-only workspaces, an
offline hub id, URL characters in paths, failed edits, lock waits.

Each test drives the CLI as a user would and checks the promise: one `error:` line that says
what to do, a non-zero exit, and nothing written. docs/bad-input.md tabulates the cases.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import (CHAIN, Ws, chain, cli_cmd, cli_env, clone_workspace,  # noqa: E402,F401
                         fresh_ws, init_workspace_inprocess, one_line_error, tiny_assets)

HUGE = "99999999999999999999"


def _nothing_recorded(ws: Ws) -> None:
    assert ws.ledger_count() == 0 and ws.delta_files() == []
    assert not ws.tmp_dir.exists() or list(ws.tmp_dir.iterdir()) == []


# -- 1. size limits -----------------------------------------------------------------------------
def test_long_input_and_target_are_refused_at_once(fresh_ws: Ws):
    ws = fresh_ws
    long_input = "The capital of France is " * 800  # ~20,000 characters
    msg = one_line_error(ws.run("edit", "--input", long_input, "--target", "Rome"))
    # the tiny model reads 128 tokens: the context length is the binding limit here
    assert "tokens long" in msg and "max_input_tokens" in msg and "reads at most 128" in msg
    long_target = "Rome " * 5000
    msg = one_line_error(ws.run("edit", "--input", "The capital of France is", "--target", long_target))
    assert "tokens long" in msg and "max_target_tokens" in msg
    msg = one_line_error(ws.run("edit", "--input", "The capital of France is", "--target", "Rome",
                                "--paraphrase", long_input))
    assert "paraphrase" in msg and "max_input_tokens" in msg
    msg = one_line_error(ws.run("ask", "--input", long_input))
    assert "max_input_tokens" in msg
    msg = one_line_error(ws.run("ask", "--input", "The capital of France is", "--max-new-tokens", "200"))
    assert "--max-new-tokens 200" in msg and "128 tokens" in msg
    _nothing_recorded(ws)

    ws.write_config(max_target_tokens=2)  # configurable: a 3-token target is now too long
    msg = one_line_error(ws.run("edit", "--input", "The capital of France is", "--target",
                                "fifty degrees of water"))
    assert "at most 2 tokens" in msg
    ws.write_config(max_target_tokens=0)
    assert "max_target_tokens" in one_line_error(ws.run("log"))
    _nothing_recorded(ws)


# -- 2. untrusted model code --------------------------------------------------------------------
def test_model_directory_with_custom_code_is_refused_and_its_code_never_runs(fresh_ws: Ws, tmp_path):
    ws = fresh_ws
    evil = tmp_path / "evil-model"
    shutil.copytree(ws.assets.model_dir, evil)
    marker = tmp_path / "code-ran"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(cfg))
    ws.write_config(model=str(evil))
    # a user who answers "y" to whatever is asked: still refused, still nothing run
    p = subprocess.run(cli_cmd("ask", "--input", "The capital of France is"), cwd=ws.root,
                       env=cli_env(ws.cache_dir), input="y\ny\n", capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "auto_map" in p.stderr and "custom-code models are not supported" in p.stderr
    assert not marker.exists()
    assert not ws.ledger_path.exists()


def test_every_model_load_passes_trust_remote_code_false():
    """Static check: each from_pretrained / from_config in the library says it explicitly."""
    import re

    root = Path(__file__).resolve().parents[1]
    calls = 0
    for f in (root / "src" / "mendctl").rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"Auto\w*\.(from_pretrained|from_config)\(", text):
            calls += 1
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            assert "trust_remote_code=False" in text[m.end():i], f"{f.name}: {text[m.start():i]}"
    assert calls >= 5


# -- 3. a missing or wrong ledger never costs the deltas -----------------------------------------
def test_missing_ledger_is_reported_and_gc_keeps_the_deltas(chain, tmp_path):
    ws = clone_workspace(chain.ws, tmp_path / "ws")
    files = ws.delta_files()
    assert len(files) == 3
    ws.ledger_path.unlink()
    for args in (["log"], ["gc"], ["verify"], ["edit", "--input", "a b", "--target", "c"]):
        msg = one_line_error(ws.run(*args))
        assert "does not exist" in msg and "3 delta file(s)" in msg, msg
    assert not ws.ledger_path.exists()  # no empty ledger was created
    assert ws.delta_files() == files


def test_gc_refuses_a_ledger_that_knows_none_of_the_deltas(chain, tmp_path):
    from mendctl.ledger import Ledger

    ws = clone_workspace(chain.ws, tmp_path / "ws")
    files = ws.delta_files()
    other = tmp_path / "typo" / "ledger.db"  # `ledger:` pointed at a new, empty database
    Ledger(other).open().close()
    ws.write_config(ledger=f"sqlite:///{other}")
    msg = one_line_error(ws.run("gc"))
    assert "none of the 3 delta file(s)" in msg and "MiB" in msg and "gc --force" in msg
    assert ws.delta_files() == files
    r = ws.ok("gc", "--force")
    assert "removed 3 orphan file(s)" in r.stdout and ws.delta_files() == []


# -- 4. huge ids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["revert", HUGE], ["show", HUGE], ["ask", "--input", "a", "--at", HUGE],
                                  ["export", "--at", HUGE, "--out", "x"], ["show", "0"],
                                  ["audit", "--range", f"1..{HUGE}"], ["squash", f"1..{HUGE}"]])
def test_huge_or_negative_ids_are_no_entry(chain, tmp_path, args):
    ws = clone_workspace(chain.ws, tmp_path / "ws")
    msg = one_line_error(ws.run(*args))
    assert "no entry" in msg
    assert ws.ledger_count() == 3


# -- 5. read-only workspaces ---------------------------------------------------------------------
def _read_only_runner(tmp_path: Path):
    """How to run a command with some paths mounted read-only: a private mount namespace
    (`unshare -rm`, a bind mount made read-only), so even root gets EROFS as on a real
    read-only mount. Skips where the kernel allows no user namespaces."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a read-only mount")
    probe = tmp_path / "ro-probe"
    probe.mkdir()
    p = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro '{probe}' '{probe}' && "
                        f"touch '{probe}/x'"], capture_output=True, text=True)
    if "Read-only file system" not in p.stderr:
        pytest.skip(f"cannot make a read-only mount here (unshare -rm: {p.stderr.strip()[:200]})")

    def run(ws: Ws, read_only: list[Path], *args):
        mounts = " && ".join(f"mount --bind -o ro '{d}' '{d}'" for d in read_only)
        cmd = " ".join(f"'{a}'" for a in cli_cmd(*args))
        p = subprocess.run(["unshare", "-rm", "sh", "-c", f"{mounts} && exec {cmd}"], cwd=ws.root,
                           env=cli_env(ws.cache_dir), capture_output=True, text=True, timeout=300)
        from e2e_helpers import Result
        return Result(list(args), p.returncode, p.stdout, p.stderr)
    return run


def test_read_only_workspace_reads_work_and_writes_say_read_only(chain, tmp_path):
    run = _read_only_runner(tmp_path)
    ws = clone_workspace(chain.ws, tmp_path / "ws")
    # an archive: ledger checkpointed and closed, no WAL side files, every state cache gone
    con = sqlite3.connect(ws.ledger_path)
    con.execute("PRAGMA journal_mode=DELETE")
    con.close()
    shutil.rmtree(ws.state_dir / "states", ignore_errors=True)
    before = {p: p.stat().st_mtime_ns for p in ws.root.rglob("*") if p.is_file()}

    for args, want in ((["log"], "edit"), (["show", "2"], "state_hash"), (["verify"], "3 entries: ok"),
                       (["ask", "--input", "The capital of France is", "--at", "2"], "→")):
        r = run(ws, [ws.root], *args)
        assert r.returncode == 0 and want in r.stdout, str(r)
    r = run(ws, [ws.root], "edit", "--input", "Water boils at", "--target", "ten")
    assert "read-only" in one_line_error(r)
    r = run(ws, [ws.root], "gc")
    assert "read-only" in one_line_error(r)
    assert {p: p.stat().st_mtime_ns for p in ws.root.rglob("*") if p.is_file()} == before
    # only the store read-only: the edit is refused before anything is computed or written
    files = ws.delta_files()
    r = run(ws, [ws.state_dir / "deltas"], "edit", "--input", "Water boils at", "--target", "ten")
    assert "read-only" in one_line_error(r)
    assert ws.ledger_count() == 3 and ws.delta_files() == files


# -- 6. hub ids offline ---------------------------------------------------------------------------
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 # a hub that refuses connections: what an offline machine sees
                                 {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_hub_id_offline_says_so_quickly(fresh_ws: Ws, env, tmp_path):
    ws = fresh_ws
    ws.write_config(model="some-org/some-model")
    # (quick by construction: one probe of at most models.HUB_PROBE_SECONDS, no download
    # retries; its time is not asserted here, timings belong in bench/)
    p = subprocess.run(cli_cmd("ask", "--input", "The capital of France is"), cwd=ws.root,
                       env=cli_env(ws.cache_dir, {"HF_HOME": str(tmp_path / "hf"), **env}),
                       capture_output=True, text=True, timeout=120)
    from e2e_helpers import Result
    msg = one_line_error(Result([], p.returncode, p.stdout, p.stderr))
    assert "offline" in msg and "some-org/some-model" in msg and "model: DIR" in msg
    assert not ws.ledger_path.exists()


# -- 7. URL characters in the workspace path ------------------------------------------------------
@pytest.mark.parametrize("name", ["ws?v=1", "w s%41", "ws#frag", "wörk-ş"])
def test_ledger_stays_inside_a_workspace_with_url_characters(tiny_assets, tmp_path, name):
    cache = tmp_path / "cache"
    cache.mkdir()
    parent = tmp_path / "x"
    a = init_workspace_inprocess(parent / name, tiny_assets, cache)
    twin = init_workspace_inprocess(parent / (name + "2"), tiny_assets, cache)
    a.ok("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1])
    assert a.ledger_count() == 1 and a.ledger_path.is_file()
    assert sorted(p.name for p in parent.iterdir()) == sorted([name, name + "2"])  # no stray db
    assert twin.ok("log", "--json").json() == []


# -- 8. the recorded editor hash is that of the bytes loaded --------------------------------------
def test_tampered_editor_is_refused_and_the_hash_is_of_the_loaded_bytes(fresh_ws: Ws, tmp_path):
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    ws = fresh_ws
    ed = tmp_path / "editor"
    shutil.copytree(ws.assets.editor_dir, ed)
    t = load_file(str(ed / "editor.safetensors"))
    t["alpha"] = t["alpha"] * 2
    save_file(t, str(ed / "editor.safetensors"))
    ws.write_config(editor=str(ed))
    msg = one_line_error(ws.run("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1]))
    assert "does not match the weights_sha256" in msg
    _nothing_recorded(ws)

    doc = json.loads((ed / "editor.json").read_text())  # no claim at all: the bytes decide
    del doc["weights_sha256"]
    (ed / "editor.json").write_text(json.dumps(doc))
    ws.ok("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1])
    shown = ws.ok("show", "1", "--json").json()
    assert shown["editor_sha256"] == hashlib.sha256((ed / "editor.safetensors").read_bytes()).hexdigest()
    assert torch.equal(load_file(str(ed / "editor.safetensors"))["alpha"], t["alpha"])


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "editor.json").write_text("{not json"), ["cannot be read as JSON"]),
    (lambda d: _edit_json(d, lambda doc: doc["config"].update(colour="blue")),
     ["unknown editor setting", "colour"]),
    (lambda d: _edit_json(d, lambda doc: doc.pop("weights")), ["`weights`"]),
    (lambda d: (d / "editor.safetensors").write_bytes(b"\0" * 64), ["does not match"]),
])
def test_damaged_editor_directory_is_one_clear_line(fresh_ws: Ws, tmp_path, damage, words):
    ws = fresh_ws
    ed = tmp_path / "editor"
    shutil.copytree(ws.assets.editor_dir, ed)
    damage(ed)
    ws.write_config(editor=str(ed))
    msg = one_line_error(ws.run("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1]))
    for w in words:
        assert w in msg
    _nothing_recorded(ws)


def _edit_json(d: Path, change) -> None:
    doc = json.loads((d / "editor.json").read_text())
    change(doc)
    (d / "editor.json").write_text(json.dumps(doc))


# -- 9. failed edits and invisible targets --------------------------------------------------------
def test_an_edit_that_did_not_take_is_not_recorded_unless_kept(fresh_ws: Ws):
    ws = fresh_ws
    ws.write_config(keep_failed=False)  # the default (the tiny workspaces keep them)
    args = ("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1], "--max-steps", "1")
    r = ws.run(*args)  # the untrained tiny editor does not land this in one step
    msg = one_line_error(r)
    assert r.returncode == 3 and "did not take" in msg and "--keep-failed" in msg
    _nothing_recorded(ws)
    r = ws.ok(*args, "--keep-failed", "--json")
    assert "warning: the edit did not take" in r.stderr and "status `failed`" in r.stderr
    rep = r.json()
    assert rep["failed"] == [CHAIN[0][0]] and rep["after"]["edit_success"] == 0.0
    assert ws.ok("show", "1", "--json").json()["status"] == "failed"
    assert "[failed]" in ws.ok("log").stdout


@pytest.mark.parametrize("target", ["\u00a0", "\u200b", "\u200e\u200f", "\ufeff ", "\u3164", " \t\u2028"])
def test_targets_of_invisible_characters_are_refused(fresh_ws: Ws, target):
    ws = fresh_ws
    msg = one_line_error(ws.run("edit", "--input", CHAIN[0][0], "--target", target))
    assert "invisible" in msg
    batch = ws.root / "facts.jsonl"
    batch.write_text(json.dumps({"input": CHAIN[0][0], "target": "Rome"}) + "\n"
                     + json.dumps({"input": CHAIN[1][0], "target": target}) + "\n")
    msg = one_line_error(ws.run("edit", "--batch", batch))
    assert "facts.jsonl:2:" in msg and "invisible" in msg
    _nothing_recorded(ws)


# -- 10. the lock: wait as long as the holder runs -------------------------------------------------
def test_a_writer_waits_for_a_live_holder_and_says_so(fresh_ws: Ws):
    ws = fresh_ws
    # the holder keeps the lock until the writer has said that it waits (then we let it go)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from mendctl.locking import WorkspaceLock
        with WorkspaceLock({str(ws.state_dir / 'lock')!r}, timeout=0, command="a long edit"):
            print("held", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=cli_env(ws.cache_dir))
    writer = None
    try:
        assert holder.stdout.readline().strip() == "held"
        # the default lock_timeout (null): no give-up time, only the holder's lifetime
        writer = subprocess.Popen(cli_cmd("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1]),
                                  cwd=ws.root, env=cli_env(ws.cache_dir), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        first = writer.stderr.readline()  # blocks until the writer says something
        assert f"waiting for the workspace lock, held by process {holder.pid}" in first, first
        assert "a long edit" in first
        holder.stdin.write("go\n")
        holder.stdin.flush()
        out, err = writer.communicate(timeout=300)
    finally:
        holder.kill() if holder.poll() is None else None
        if writer is not None and writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0, first + err
    assert ws.ledger_count() == 1


def test_lock_timeout_message_names_the_real_setting(fresh_ws: Ws):
    from mendctl.locking import WorkspaceLock

    ws = fresh_ws
    ws.write_config(lock_timeout=0)
    with WorkspaceLock(ws.state_dir / "lock", timeout=0, command="pytest"):
        msg = one_line_error(ws.run("edit", "--input", CHAIN[0][0], "--target", CHAIN[0][1]))
    assert "`lock_timeout: null` in mendctl.yaml" in msg and "pass a" not in msg
    _nothing_recorded(ws)


# -- 11. the rest: one line, not a traceback -------------------------------------------------------
def test_log_with_a_negative_count_is_refused(chain, tmp_path):
    ws = clone_workspace(chain.ws, tmp_path / "ws")
    r = ws.run("log", "-n", "-1")
    assert r.returncode == 2 and "-1" in r.stderr and "Traceback" not in r.stderr
    assert len(ws.ok("log", "-n", "2", "--json").json()) == 2


def test_unknown_keys_of_a_batch_line_are_named(fresh_ws: Ws):
    ws = fresh_ws
    batch = ws.root / "facts.jsonl"
    batch.write_text(json.dumps({"input": CHAIN[0][0], "target": "Rome", "paraphrase": ["x y"],
                                 "subject": "France"}) + "\n")
    r = ws.ok("edit", "--batch", batch, "--dry-run")
    warn = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warn) == 1 and "record 1" in warn[0] and "paraphrase" in warn[0]
    assert "subject" not in warn[0]  # a known metadata key
