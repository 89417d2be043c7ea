"""mendctl: edit facts in a language model with MEND and keep a ledger of every change."""

__version__ = "0.1.0"
