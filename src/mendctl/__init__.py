"""mendctl: edit facts in a language model with MEND and keep a ledger of every change."""

__version__ = "0.1.0"


def __getattr__(name):
    # `from mendctl import load_edited` without importing torch for every `mendctl` command
    if name == "load_edited":
        from .deploy import load_edited

        return load_edited
    raise AttributeError(f"module 'mendctl' has no attribute {name!r}")
