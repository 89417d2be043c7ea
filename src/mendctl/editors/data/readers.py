"""Readers for the edit-data formats users already have: zsRE (MEND) and CounterFact (ROME).

This module owns converting those files to :class:`~.schema.EditCase` lists, and
:func:`read_cases`, which picks the reader from the file's content.

* zsRE as MEND ships it (``zsre_mend_train.json`` / ``_eval.json``, one JSON object per line
  or a JSON array): ``{"subject", "src", "pred", "rephrase", "alt", "answers", "loc",
  "loc_ans", "cond"}`` -> input = src, target = alt, paraphrases = [rephrase], locality =
  [loc without its "nq question: " prefix]; subject, answers, pred, loc_ans... go to meta.
* CounterFact as ROME ships it (``counterfact.json``, a JSON array): input =
  requested_rewrite.prompt with the subject put in its "{}", target = target_new.str,
  paraphrases = paraphrase_prompts, locality = neighborhood_prompts.

Malformed records raise :class:`~.schema.DataError` naming the file and the line (JSONL) or
the 0-based record index (JSON array), and saying what is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .schema import CORE_FIELDS, DataError, EditCase, read_jsonl

__all__ = ["read_zsre", "read_counterfact", "read_cases", "FORMATS"]

FORMATS = ("auto", "jsonl", "zsre", "counterfact")
_NQ_PREFIX = "nq question: "


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("no such file; check the path", path=path) from None
    except IsADirectoryError:
        raise DataError("is a directory; give the path of a data file", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read the file: {e.strerror or e}", path=path) from None
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 ({e.reason}); save the file as UTF-8", path=path, line=line) from None


def _records(path: Path, text: str) -> Iterator[tuple[dict, Any]]:
    """Yield (location, record) from a JSON array or a JSONL text.

    The location is ``{"line": n}`` for JSONL and ``{"record": i}`` for an array, ready to
    be passed to DataError.
    """
    stripped = text.lstrip()
    if not stripped:
        raise DataError("the file is empty; expected edit records", path=path)
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=e.lineno) from None
        if not data:
            raise DataError("the JSON array is empty; expected edit records", path=path)
        for i, rec in enumerate(data):
            yield {"record": i}, rec
        return
    n = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line "
                "or a single JSON array", path=path, line=lineno,
            ) from None
        n += 1
        yield {"line": lineno}, rec
    if n == 0:  # pragma: no cover - guarded by the empty check above
        raise DataError("no records in the file", path=path)


def _need_str(rec: dict, key: str, what: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f'"{key}" ({what}) must be a non-empty string, got {v!r}')
    return v


def _str_list(rec: dict, key: str) -> list[str]:
    v = rec.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise DataError(f'"{key}" must be a string or a list of strings, got {type(v).__name__}')
    return [x for x in v if x.strip()]


def _meta(rec: dict, skip: set[str]) -> dict:
    # Keep every other key as metadata, except names the schema itself uses.
    return {k: rec[k] for k in sorted(rec) if k not in skip and k not in CORE_FIELDS and k != "meta"}


def _zsre_case(rec: Any) -> EditCase:
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object with zsRE keys (src, alt, ...), got {type(rec).__name__}")
    src = _need_str(rec, "src", "the question")
    alt = _need_str(rec, "alt", "the new answer")
    loc = []
    for q in _str_list(rec, "loc"):
        # MEND prefixes the Natural Questions locality prompts with "nq question: ".
        q = q[len(_NQ_PREFIX):] if q.lower().startswith(_NQ_PREFIX) else q
        if q.strip():
            loc.append(q)
    meta = _meta(rec, {"src", "alt", "rephrase", "loc"})
    answers = rec.get("answers")
    if isinstance(answers, list) and answers and isinstance(answers[0], str):
        meta["true_target"] = answers[0]
    meta.setdefault("source_format", "zsre")
    return EditCase(input=src, target=alt, paraphrases=_str_list(rec, "rephrase"), locality=loc, meta=meta)


def _counterfact_case(rec: Any) -> EditCase:
    if not isinstance(rec, dict):
        raise DataError(f"expected a CounterFact object, got {type(rec).__name__}")
    rr = rec.get("requested_rewrite")
    if not isinstance(rr, dict):
        raise DataError('"requested_rewrite" must be an object with prompt, subject and target_new')
    prompt = _need_str(rr, "prompt", 'the prompt with "{}" for the subject')
    subject = _need_str(rr, "subject", "the subject")
    if "{}" not in prompt:
        raise DataError(f'requested_rewrite.prompt must contain "{{}}" where the subject goes, got {prompt!r}')
    tnew = rr.get("target_new")
    if not isinstance(tnew, dict) or not isinstance(tnew.get("str"), str) or not tnew["str"].strip():
        raise DataError(f'requested_rewrite.target_new must be {{"str": "<new answer>"}}, got {tnew!r}')
    meta: dict[str, Any] = {"subject": subject, "source_format": "counterfact"}
    if "case_id" in rec:
        meta["case_id"] = rec["case_id"]
    if "relation_id" in rr:
        meta["relation"] = rr["relation_id"]
    ttrue = rr.get("target_true")
    if isinstance(ttrue, dict) and isinstance(ttrue.get("str"), str):
        meta["true_target"] = ttrue["str"]
    for key in ("generation_prompts", "attribute_prompts"):
        if key in rec:
            meta[key] = _str_list(rec, key)
    return EditCase(
        # replace rather than str.format: a prompt with other braces must not break.
        input=prompt.replace("{}", subject),
        target=tnew["str"],
        paraphrases=_str_list(rec, "paraphrase_prompts"),
        locality=_str_list(rec, "neighborhood_prompts"),
        meta=meta,
    )


def _convert(path: Path, text: str, make) -> list[EditCase]:
    cases = []
    for where, rec in _records(path, text):
        try:
            cases.append(make(rec))
        except DataError as e:
            raise DataError(e.reason, path=path, **where) from None
    return cases


def read_zsre(path: str | os.PathLike) -> list[EditCase]:
    """Read a zsRE file in MEND's format (JSONL or a JSON array)."""
    p = Path(path)
    return _convert(p, _read_text(p), _zsre_case)


def read_counterfact(path: str | os.PathLike) -> list[EditCase]:
    """Read a CounterFact file in ROME's format (a JSON array; JSONL also accepted)."""
    p = Path(path)
    return _convert(p, _read_text(p), _counterfact_case)


def _sniff(path: Path, text: str) -> str:
    """Which format a file is, from its first record's keys."""
    first = None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return "json-array"  # the array reader reports the error with its line
        first = data[0] if isinstance(data, list) and data else None
        if isinstance(first, dict) and "input" in first:
            return "json-array"
    else:
        for line in text.split("\n"):
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return "jsonl"
                break
    if isinstance(first, dict):
        if "requested_rewrite" in first:
            return "counterfact"
        if "src" in first and "alt" in first and "input" not in first:
            return "zsre"
    return "jsonl"


def read_cases(path: str | os.PathLike, format: str = "auto") -> list[EditCase]:
    """Read edit cases in any supported format.

    ``format``: "jsonl" (mendctl's schema), "zsre", "counterfact", or "auto", which looks at
    the first record: ``requested_rewrite`` means CounterFact, ``src`` + ``alt`` means zsRE,
    anything else is mendctl's schema (one object per line, or a JSON array of them).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    p = Path(path)
    if format == "jsonl":
        return read_jsonl(p)
    if format == "zsre":
        return read_zsre(p)
    if format == "counterfact":
        return read_counterfact(p)
    text = _read_text(p)
    kind = _sniff(p, text)
    if kind == "counterfact":
        return _convert(p, text, _counterfact_case)
    if kind == "zsre":
        return _convert(p, text, _zsre_case)
    if kind == "json-array":
        return _convert(p, text, EditCase.from_dict)
    return read_jsonl(p)
