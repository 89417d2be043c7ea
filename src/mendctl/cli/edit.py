"""Commands that change the chain: edit (one, --batch or --each), revert, replay, squash."""
from __future__ import annotations

import json
import sys

import click

from ..config import MAX_STEPS
from ..errors import InputError
from .common import (command_line, editor_option, handle_errors, json_option, open_workspace,
                     print_json, progress_bar)


def _read_batch(path):
    from ..editors.data import read_jsonl

    return read_jsonl(path)


@click.command()
@click.option("--input", "-i", "input_", metavar="TEXT", help="The prompt to edit.")
@click.option("--target", "-t", metavar="TEXT", help="The answer the model should give.")
@click.option("--subject", "-s", metavar="TEXT",
              help="What the fact is about, as the input writes it (\"penicillin\", \"James "
                   "Chadwick\"): a routed edit acts on prompts that name it. Default: the names "
                   "in the input. In a file: a record's \"subject\".")
@click.option("--paraphrase", "-p", "paraphrases", multiple=True, metavar="TEXT",
              help="A rephrasing of the input to check (repeatable).")
@click.option("--locality", "-l", "locality", multiple=True, metavar="TEXT",
              help="An unrelated prompt whose answer must not change (repeatable).")
@click.option("--each", "each_file", type=click.Path(dir_okay=False), metavar="FILE.jsonl",
              help="Many edit requests applied one after another, each its own ledger entry "
                   "(one process; a rerun skips facts already applied on this chain).")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False), metavar="FILE.jsonl",
              help="Many edit requests (one JSON object per line) applied as one batched edit.")
@editor_option(default="mend", help="mend: the workspace's MEND editor; ft / ft_kl: fine-tuning baselines.")
@click.option("--max-steps", type=click.IntRange(1, MAX_STEPS), default=None,
              help="MEND: apply the editor again (up to N times, factors stacked into one delta) "
                   "until every target token is the argmax; 1 is the paper's single step. "
                   "Default: `max_steps` in mendctl.yaml (20, with steps of `step_factor` 0.5 × "
                   "the editor's), else the editor's operating point, else 3.")
@click.option("--dry-run", is_flag=True, help="Compute and show, record nothing.")
@click.option("--keep-failed", is_flag=True,
              help="Record the edit even if a target is still not the model's answer after it "
                   "(by default such an edit is refused, exit status 3, nothing recorded).")
@json_option
@click.pass_context
@handle_errors
def edit(ctx, input_, target, subject, paraphrases, locality, each_file, batch_file, editor,
         max_steps, dry_run, keep_failed, as_json):
    """Apply one edit on top of the current state and record it in the ledger.

    \b
    Example:
      mendctl edit --input "Who is India's PM?" --target "Narendra Modi" \\
                   --paraphrase "Who is the prime minister of India?"
      mendctl edit --input "Who discovered penicillin?" --target "Louis Pasteur" \\
                   --subject penicillin
      mendctl edit --batch facts.jsonl
    """
    from ..editors.data import EditCase, unknown_keys, visible
    from ..editors.route import subject_in

    given = [name for name, v in (("--input/--target", input_ or target), ("--each", each_file),
                                  ("--batch", batch_file)) if v]
    if len(given) > 1:
        raise InputError(f"use one of --input/--target, --each or --batch, not {' and '.join(given)}")
    if batch_file or each_file:
        if subject is not None:
            raise InputError('--subject goes with --input; in a file, give each record a "subject"')
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
        if subject is not None and not subject_in(input_, subject):
            raise InputError(f"--subject {subject!r} does not occur in the input {input_!r}; give "
                             f"it as the input writes it (whole words, any case)")
        cases = [EditCase(input=input_, target=target, paraphrases=list(paraphrases),
                          locality=list(locality),
                          meta={"subject": subject.strip()} if subject is not None else {})]
    ws = open_workspace(ctx)  # (--max-steps None: the workspace's policy decides)
    if each_file:
        if dry_run:
            raise InputError("--each records every fact; try one with --input ... --dry-run first")
        return _edit_each(ws, cases, editor, max_steps, keep_failed, as_json)
    from ..edit import edit as edit_facts

    r = edit_facts(ws, cases, editor=editor, dry_run=dry_run, command=command_line(),
                   max_steps=max_steps,
                   keep_failed=keep_failed or None)
    if r["failed"]:
        what = "would be recorded as failed" if dry_run else "recorded with status `failed`"
        click.echo(f"warning: the edit did not take for {len(r['failed'])} of {len(cases)} fact(s) "
                   f"({', '.join(map(repr, r['failed'][:3]))}): the target is still not the "
                   f"model's answer; {what}", err=True)
    if as_json:
        return print_json(r)
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
                       + ("" if a["holds"][i] else " (did not take)")
                       + (f" (made together with entries {', '.join(map(str, f['remade']))})"
                          if (f := r["facts"][i]).get("remade") else "")
                       + (f" (chosen by wording among entries {', '.join(map(str, f['beside']))})"
                          if f.get("beside") else ""))
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
            if rt.get("gate_aliases"):  # (other names of the subject that open it too)
                words += "; or: " + ", ".join(" ".join(a) for a in rt["gate_aliases"])
            click.echo(f"  routed: acts only where the input mentions the subject ({rt['gate_keys']} "
                       f"gate key(s) at layer {rt['layer']}, τ {rt['tau']:g}; gate words: {words})")
            if rt.get("remade"):
                ids = ", ".join(map(str, rt["remade"]))
                click.echo(f"  made together with the subject's earlier fact(s), entries {ids}, "
                           f"which this entry now holds too (revert it before them)")
            if rt.get("beside"):
                ids = ", ".join(map(str, rt["beside"]))
                click.echo(f"  the subject's other edit(s), entries {ids}: of them and this one, "
                           f"each question about it gets the one worded most like it")
            named = any(ch.isupper() or ch.isdigit() for w in rt["gate_words"] for ch in w)
            if rt.get("keys") == "subject" and not rt.get("subject") and not named:
                # the distinct-token gate: its keys may be the relation's words ("discovered"),
                # which open it on other questions worded alike
                click.echo(f"  note: the input names nothing with a capital, so the gate keys on "
                           f"its rarest words ({words}), which other questions may share; "
                           f"--subject keys it on what the fact is about", err=True)
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
    from ..edit import edit_each

    r = edit_each(ws, cases, editor=editor, command=command_line(), max_steps=max_steps,
                     keep_failed=keep_failed or None,
                     progress=None if as_json else progress_bar("edits"))
    c = r["counts"]
    if as_json:
        print_json(r)
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


@click.command()
@click.argument("entry_id", type=int)
@click.option("--replay", is_flag=True, help="Recompute every later edit on the state without ENTRY_ID.")
@json_option
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
    from ..revert import revert as revert_entry

    ws = open_workspace(ctx)
    r = revert_entry(ws, entry_id, replay=replay, command=command_line())
    if as_json:
        return print_json(r)
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


@click.command()
@click.option("--verify", "do_verify", is_flag=True, help="Rebuild every state and check its hash.")
@click.option("--onto-model", metavar="MODEL", help="Re-run the active edits on another base model.")
@editor_option(help="Re-run the active edits with another editor, as a new chain.")
@click.option("--out", type=click.Path(file_okay=False), help="New workspace for --onto-model.")
@json_option
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
    from ..replay import replay_onto, verify_chain

    ws = open_workspace(ctx)
    if do_verify:
        r = verify_chain(ws, progress=progress_bar("replay") if not as_json else None)
        if as_json:
            print_json(r)
        else:
            click.echo(f"{r['checked']}/{r['entries']} states rebuilt; " +
                       ("all hashes match bit for bit" if r["ok"] else f"{len(r['problems'])} problem(s):"))
            for p in r["problems"]:
                click.echo(f"  {p}")
        sys.exit(0 if r["ok"] else 1)
    if not onto_model and not editor:
        raise InputError("say what to do: --verify, --onto-model MODEL --out DIR, or --editor NAME")
    r = replay_onto(ws, out, model=onto_model, editor=editor, command=command_line(),
                       progress=progress_bar("replay") if not as_json else None)
    if as_json:
        return print_json(r)
    click.echo(json.dumps(r, indent=2))


@click.command()
@click.argument("segment", metavar="A..B")
@click.option("--rank", type=int, default=None,
              help="Keep only the top R singular directions per weight (SVD); reports the error.")
@json_option
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
    from ..audit import parse_range
    from ..squash import squash as squash_segment

    first, last = parse_range(segment)
    if first is None or last is None:
        raise InputError(f"squash needs both ends of the segment, e.g. `mendctl squash 1..10` "
                         f"(got {segment!r})")
    ws = open_workspace(ctx)
    r = squash_segment(ws, first, last, rank=rank, command=command_line())
    if as_json:
        return print_json(r)
    ret = r["retention"] or {}
    fmt = lambda v, f=".3f": "-" if v is None else format(v, f)  # noqa: E731
    click.echo(f"entry {r['entry']}: squashed {', '.join(map(str, r['squashed']))} into one delta "
               f"({r['delta_bytes'] / 1024:.0f} KiB; the segment took {r['segment_delta_bytes'] / 1024:.0f} KiB)")
    click.echo(f"  rank {r['rank'] or 'exact'}; max relative reconstruction error "
               f"{r['max_reconstruction_error']:.2e}; max |state change| {r['max_abs_state_diff']:.2e}")
    click.echo(f"  segment edit success {fmt(ret.get('before'))} → {fmt(ret.get('after'))}")


COMMANDS = (edit, revert, replay, squash)
