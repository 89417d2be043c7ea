"""Commands on the workspace and its ledger: init, ask, log, show, verify, gc, and the `db`
group (the ledger's schema).
"""
from __future__ import annotations

import json
import sys

import click

from ..errors import InputError
from .common import handle_errors, json_option, open_workspace, print_json


@click.command()
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
    from ..workspace import Workspace

    if plain and routed:
        raise InputError("--weights and --routed exclude each other (routed edits are the default)")
    d = Workspace.init(directory, force=force, model=model, routing_=False if plain else None)
    click.echo(f"workspace ready: {d}/mendctl.yaml (edit it to change the model or settings)")


@click.command()
@click.option("--input", "-i", "inputs", multiple=True, required=True, metavar="TEXT",
              help="A prompt; repeat for several (one model load).")
@click.option("--at", type=int, metavar="ID", help="Answer with the model as it was after entry ID.")
@click.option("--max-new-tokens", type=click.IntRange(1, 512), default=16, show_default=True)
@json_option
@click.pass_context
@handle_errors
def ask(ctx, inputs, at, max_new_tokens, as_json):
    """Greedy answers of the current model (or of the state after entry --at).

    \b
    Example:
      mendctl ask --input "The capital of France is" --input "Who is India's PM?"
    """
    ws = open_workspace(ctx)
    out = ws.ask(list(inputs), at=at, max_new_tokens=max_new_tokens)
    out["load_seconds"] = round(ws.lm.load_seconds, 3)
    if as_json:
        return print_json(out)
    where = f"after entry {out['state']}" if out["state"] else "base model"
    click.echo(f"# {out['model']} ({where}, state {out['state_hash'][:12]})")
    for a in out["answers"]:
        click.echo(f"{a['input']!r} → {a['answer']!r}")


@click.command()
@click.option("-n", "limit", type=click.IntRange(min=0), default=None, help="Show at most N entries.")
@json_option
@click.pass_context
@handle_errors
def log(ctx, limit, as_json):
    """The ledger, newest first: id, time, kind, input → target, ES after, delta size.

    \b
    Example:
      mendctl log -n 5
    """
    ws = open_workspace(ctx)
    entries = ws.ledger.entries(limit=limit)
    head = ws.head()
    audited = {a.entry_id for a in ws.ledger.audits()}
    if as_json:
        return print_json([e.to_dict() | {"active": bool(head and e.id in head.active_ids),
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
            extra = " of " + ",".join(map(str, e.record.squashed or []))
        rec = e.record
        b = rec.batch
        if b:
            extra += f" (batch of {b['size']} from {b['first']})"
        if (rec.routing or {}).get("remade"):
            extra += " (with " + ",".join(map(str, rec.routing["remade"])) + ")"
        if e.status and e.status != "ok":
            extra += f" [{e.status}]"
        es = (e.metrics_after or {}).get("edit_success")
        size = f"{e.delta_size / 1024:.0f} KiB" if e.delta_size else "-"
        flags = ("*" if active else " ") + ("A" if e.id in audited else " ") + \
            ("R" if rec.routing else " ")
        health = (rec.health or {}).get("audit_locality")
        health = f"  base-agree {health:.3f}" if health is not None else ""
        click.echo(f"{flags} {e.id:>4}  {e.created_at:%Y-%m-%d %H:%M:%S}  {e.kind:<7}{extra}  "
                   f"{what}  ES {es if es is None else f'{es:.2f}'}{health}  {size}")
    if entries:
        click.echo("(* active in the current state, A audited, R routed; base-agree: the state's "
                   "top-1 agreement with the base model on the audit set, measured at edit time)")


@click.command()
@click.argument("entry_id", type=int)
@json_option
@click.pass_context
@handle_errors
def show(ctx, entry_id, as_json):
    """Everything the ledger holds about one entry.

    \b
    Example:
      mendctl show 3
    """
    ws = open_workspace(ctx)
    d = ws.ledger.get(entry_id).to_dict()
    if as_json:
        return print_json(d)
    for k, v in d.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(_brief(v), ensure_ascii=False)
        click.echo(f"{k:>16}: {v}")


def _brief(v):
    """`v` with long strings (a routed gate's recorded key bytes) given as their length: the
    text view stays readable; `--json` has them whole."""
    if isinstance(v, dict):
        return {k: _brief(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_brief(x) for x in v]
    return f"<{len(v)} characters>" if isinstance(v, str) and len(v) > 200 else v


@click.command()
@json_option
@click.pass_context
@handle_errors
def verify(ctx, as_json):
    """Check every delta file (hash, shapes, finite values), the chain and orphans.

    \b
    Example:
      mendctl verify
    """
    from ..verify import verify as check

    ws = open_workspace(ctx)
    r = check(ws)
    if as_json:
        print_json(r)
    else:
        click.echo(f"{r['entries']} entries: " + ("ok" if r["ok"] else f"{len(r['problems'])} problem(s)"))
        for p in r["problems"]:
            click.echo(f"  {p}")
    sys.exit(0 if r["ok"] else 1)


@click.command()
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
    from ..verify import gc as collect

    removed = collect(open_workspace(ctx), force=force)
    click.echo(f"removed {len(removed)} orphan file(s)")
    for p in removed:
        click.echo(f"  {p}")


# -- ledger schema ------------------------------------------------------------------------------
@click.group()
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
    ws = open_workspace(ctx.parent)
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
    from ..ledger import Ledger

    ws = open_workspace(ctx.parent)
    led = Ledger(ws.ledger_url)
    click.echo(f"{led.current_revision()} (this mendctl's head: {led.head_revision()})")


COMMANDS = (init, ask, log, show, verify, gc, db)
