"""What every command shares: error handling, the workspace opener, JSON and progress output,
and the options several commands declare (--json, --editor), each declared once here.

The option decorators follow sqlite-utils' `output_options`: a function that applies
click.option to a command, so that a flag's name, type and help cannot drift between commands.
"""
from __future__ import annotations

import errno
import functools
import json
import shlex
import sys

import click

from ..errors import MendctlError
from ..policy import EDITORS


def command_line() -> str:
    return "mendctl " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..editors.data import DataError
        from ..editors.mend.editor import EditorMismatch

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


def open_workspace(ctx):
    from ..workspace import Workspace

    return Workspace.open(ctx.obj.get("workspace"))


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def progress_bar(desc):
    from tqdm import tqdm

    return lambda xs: tqdm(xs, desc=desc, file=sys.stderr, dynamic_ncols=True)


def json_option(fn=None, *, help="Print JSON."):
    """`--json` (parameter `as_json`): `@json_option`, or `@json_option(help=...)` where the
    command says what the JSON holds."""
    decorator = click.option("--json", "as_json", is_flag=True, help=help)
    return decorator if fn is None else decorator(fn)


def editor_option(default=None, help=None):
    """`--editor`, one of EDITORS; with a default, --help shows it."""
    shown = {"default": default, "show_default": True} if default is not None else {}
    return click.option("--editor", type=click.Choice(EDITORS), help=help, **shown)
