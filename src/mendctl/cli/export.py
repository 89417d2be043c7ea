"""The export command: a state as a Hugging Face checkpoint or a PEFT adapter."""
from __future__ import annotations

import click

from .common import handle_errors, open_workspace


@click.command()
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
    from ..export import export as export_state

    ws = open_workspace(ctx)
    r = export_state(ws, out, at=at, fmt=fmt)
    click.echo(f"wrote {r['format']} export of state {r['entry']} to {r['out']}")
    if r["routed_ids"]:
        click.echo(f"  it routes edits {r['routed_ids']}: load it with "
                   f"`model, tokenizer = mendctl.load_edited({r['out']!r})` (a plain "
                   f"from_pretrained gets the weights without the routed edits)")


COMMANDS = (export,)
