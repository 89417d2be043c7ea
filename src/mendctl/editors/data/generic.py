"""A small natural-text sample that ships with mendctl, for generic-text perplexity.

This module owns the text used to measure how much an edit damages the model outside the
edited fact: perplexity on these passages before and after (drawdown = ppl_after /
ppl_before - 1). The passages must be fixed and offline, so they are a package resource,
``resources/generic_text.txt``.

Source: 86 prose paragraphs (40-117 words, about 32 KB) of the Python Language Reference
as shipped with CPython 3.11.7 in the standard-library module ``pydoc_data.topics``.
Licence: PSF License Agreement (Python Software Foundation License Version 2), copyright
2001-2023 Python Software Foundation. The selection rule and licence notice are in
``resources/GENERIC_TEXT_SOURCE.md`` and in the resource file's header.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

__all__ = ["generic_text_samples", "GENERIC_TEXT_RESOURCE"]

GENERIC_TEXT_RESOURCE = "generic_text.txt"


@lru_cache(maxsize=1)
def _passages() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("resources", GENERIC_TEXT_RESOURCE).read_text(encoding="utf-8")
    body = "\n".join(line for line in text.split("\n") if not line.startswith("#"))
    # Passages are separated by blank lines; each is a single line in the file.
    return tuple(p.strip() for p in body.split("\n\n") if p.strip())


def generic_text_samples(n: int | None = None) -> list[str]:
    """The first ``n`` passages (all of them when ``n`` is None), always in the same order.

    A fixed order (not a random draw) keeps perplexities comparable between runs; asking
    for more passages than ship returns all of them.
    """
    passages = _passages()
    if n is None:
        return list(passages)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    return list(passages[:n])
