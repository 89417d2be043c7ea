"""Commands that measure without changing the chain: eval (fresh edits, or --chain in a
scratch workspace) and audit (the chain's retention, locality and drift, recorded in the ledger).
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..config import MAX_STEPS
from ..errors import InputError
from .common import (editor_option, handle_errors, json_option, open_workspace, print_json,
                     progress_bar)


@click.command("eval")
@click.option("--data", "data_file", type=click.Path(dir_okay=False),
              help="Edit cases (JSONL, zsRE or CounterFact; default: the bundled test split).")
@editor_option(default="mend")
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
@click.option("--keep", "keep_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="With --chain: make the chain's scratch workspace in DIR (a new directory) "
                   "and keep it, to inspect the final state (mendctl -w DIR log, ask, audit).")
@json_option
@click.pass_context
@handle_errors
def eval_(ctx, data_file, split, editor, batch_size, limit, max_steps, chain, keep_dir, as_json):
    """Score an editor: each case a fresh edit of the current model.

    \b
    Example:
      mendctl eval --limit 100
      mendctl eval --split heldout --limit 100
      mendctl eval --data zsre_eval.json --limit 200
      mendctl eval --editor ft_kl --batch-size 5 --json
    """
    from ..evaluate import evaluate
    from ..training import load_cases

    ws = open_workspace(ctx)
    cases, _ = load_cases(data_file, split, ws.config.seed)
    if limit is not None:
        cases = cases[:limit]
    if keep_dir is not None and chain is None:
        raise InputError("--keep keeps the workspace of an `eval --chain T`; add --chain")
    if chain is not None:
        return _eval_chain(ws, cases[:chain], editor, max_steps, as_json, keep_dir)
    r = evaluate(ws, cases, editor=editor, batch_size=batch_size, max_steps=max_steps,
                 progress=None if as_json else progress_bar(f"eval {editor}"))
    if as_json:
        return print_json(r)
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


def _eval_chain(ws, cases, editor, max_steps, as_json, keep_dir=None):
    from ..evaluate import evaluate_chain

    r = evaluate_chain(ws, cases, editor=editor, max_steps=max_steps,
                       progress=None if as_json else progress_bar(f"chain of {len(cases)}"),
                       keep=keep_dir)
    if as_json:
        return print_json(r)
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
    kinds = {k[len("locality_"):]: v for k, v in fi.items()
             if k.startswith("locality_") and k not in ("locality_kl", "locality_unnamed")}
    if kinds:
        click.echo(f"  {'':<20} {'':>10} {'':>10}  by kind of prompt: "
                   + ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in kinds.items()))
    click.echo(f"  fluency {fmt(fi['fluency'])} (unedited {fmt(fi['fluency_base'])}), answers "
               f"repeating their target {fmt(fi['repeats_target'], '.2f')}")
    click.echo(f"  stored delta per entry: {fmt(s['stored_share'] * 100, '.1f')} % of the dense ΔW "
               f"of its weights (largest {fmt(s['stored_share_max'] * 100, '.1f')} %)")
    if s.get("workspace"):
        click.echo(f"  kept the chain's workspace in {s['workspace']} (mendctl -w {s['workspace']} "
                   f"log, ask, audit)")


@click.command()
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
@json_option
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
    from ..audit import (HIGHER_IS_BETTER, LOWER_IS_BETTER, check_result, parse_checks,
                        parse_range, record_audit, run_audit, standard_audit_set)
    from ..report import write_report
    from ..training import load_cases

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
    ws = open_workspace(ctx)
    result = run_audit(ws, first, last, aset,
                       {"locality": locality_threshold, "relative_drift": drift_threshold},
                       matrix=not no_matrix, progress=None if as_json else progress_bar("audit chain"))
    report = write_report(result, report_dir) if report_dir else None
    result["audit_id"] = record_audit(ws, result, report["dir"] if report else None)
    result["report"] = report
    failed = check_result(result, under, over)
    result["checks_failed"] = failed
    if as_json:
        print_json({k: v for k, v in result.items() if k != "chain"} |
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


COMMANDS = (eval_, audit)
