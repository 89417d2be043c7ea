"""The library's exceptions.

Everything the library raises for a user's mistake or a damaged workspace is a MendctlError
whose message says what is wrong and what to do; the CLI prints it and exits non-zero.
Anything else reaching the CLI is a bug and keeps its traceback.
"""


class MendctlError(Exception):
    """Base class: a problem the user can act on. `exit_code` is what the CLI returns."""

    exit_code = 1


class ConfigError(MendctlError):
    """mendctl.yaml is missing, malformed, or has an unknown key or a wrong type."""


class WorkspaceError(MendctlError):
    """No workspace found, or the workspace does not match what is asked of it."""


class ModelError(MendctlError):
    """A model cannot be found, loaded or matched with the workspace."""


class EditorError(MendctlError):
    """An editor checkpoint cannot be loaded or does not fit the model."""


class InputError(MendctlError):
    """Bad input from the user: empty text, a malformed data line, an unknown id..."""


class EditFailed(MendctlError):
    """An edit after which a target is still not the model's answer: not recorded by default."""

    exit_code = 3


class LedgerError(MendctlError):
    """The ledger cannot be opened, is from a newer schema, or is inconsistent."""


class StoreError(MendctlError):
    """A delta file is missing, corrupted, or not what the ledger says it is."""


class LockError(MendctlError):
    """Another process holds the workspace lock."""
