"""The `mendctl` command line: click only.

Each command parses its options, opens the workspace, calls one operation of the library, and
prints a table or, with --json, one JSON object. Library errors (MendctlError, DataError) become
one clear `error: ...` line on stderr and a non-zero exit; nothing else is caught, so bugs keep
their traceback.

This package holds the `main` group; the commands live in modules by concern (workspace, edit,
export, evaluate, train), and what they share (error handling, --json, --editor) in common.
"""
from __future__ import annotations

import click

from . import edit, evaluate, export, train, workspace


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


# Each module lists its top-level commands: a scan for click commands would also pick up
# sub-commands such as `db upgrade`, which are module-level functions too.
for _module in (workspace, edit, export, evaluate, train):
    for _command in _module.COMMANDS:
        main.add_command(_command)

__all__ = ["main"]
