"""mendctl: edit facts in a language model with MEND and keep a ledger of every change."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# A source checkout keeps editors/ and migrations/ beside this package; pyproject maps them to
# mendctl.editors and mendctl.migrations when installing. Python run from the checkout's root
# (`python -m mendctl`, `python -c ...`) imports this directory ahead of the installed copy, so
# let those sub-packages resolve from the checkout as well. An installed copy has no such
# siblings and is left alone.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "editors" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (the package's own search path)


def __getattr__(name):
    # `from mendctl import load_edited` without importing torch for every `mendctl` command
    if name == "load_edited":
        from .deploy import load_edited

        return load_edited
    raise AttributeError(f"module 'mendctl' has no attribute {name!r}")
