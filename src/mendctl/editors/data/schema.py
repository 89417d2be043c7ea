"""The edit-case record and its JSONL file format.

This module owns the one schema every part of mendctl exchanges edit cases in (``edit
--batch``, ``eval``, editor training): the :class:`EditCase` dataclass, its dict form, the
strict JSONL reader and the deterministic writer, the :class:`DataError` raised for bad
input, and :func:`join_prompt`, the single rule for gluing a prompt to its target.

One record per line::

    {"input": "Who is India's PM?", "target": "Narendra Modi",
     "paraphrases": ["Who is the prime minister of India?"],
     "locality": ["Where in the US is Raleigh?"]}

``input`` and ``target`` are required, ``paraphrases`` and ``locality`` are optional lists of
prompts, and any other key (subject, relation, true answer...) is kept as metadata and
written back at the top level.
"""

from __future__ import annotations

import json
import os
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["EditCase", "DataError", "read_jsonl", "write_jsonl", "join_prompt", "CORE_FIELDS",
           "KNOWN_META", "unknown_keys", "visible"]

# The schema's own keys, in the order they are written. Everything else is metadata.
CORE_FIELDS = ("input", "target", "paraphrases", "locality")


class DataError(ValueError):
    """Bad edit data. The message names the file and the line (or record) at fault.

    A ValueError subclass so that library callers can treat it as bad input; the CLI turns
    it into a one-line error without a traceback. ``path``, ``line`` and ``record`` stay
    available as attributes for callers that want to point at the spot themselves.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike | None = None,
        line: int | None = None,
        record: int | None = None,
    ) -> None:
        self.reason = message
        self.path = None if path is None else str(path)
        self.line = line
        self.record = record
        # Compiler-style "file:line: message" so editors and terminals can jump to the spot.
        where = ""
        if self.path is not None:
            where = self.path
            if line is not None:
                where += f":{line}"
            elif record is not None:
                where += f": record [{record}]"  # 0-based index into a JSON array
        elif line is not None:
            where = f"line {line}"
        elif record is not None:
            where = f"record [{record}]"
        super().__init__(f"{where}: {message}" if where else message)


# Letters that render as nothing (Hangul fillers, the braille blank): `visible` treats them
# like the format and separator characters.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def visible(text: str) -> bool:
    """Whether `text` has a character a reader can see: not only white space (NBSP included),
    zero-width and direction marks, byte-order marks or other control/format characters."""
    return any(not (ch.isspace() or ch in _BLANK_LETTERS
                    or unicodedata.category(ch)[0] in "CZ") for ch in text)


# Metadata keys mendctl's own data carries (the bundled builder, the zsRE and CounterFact
# readers); a batch line's other keys are kept too, but `unknown_keys` names them so a typo
# ("paraphrase" for "paraphrases") is not silently ignored.
KNOWN_META = ("case_id", "group", "relation", "subject", "true_target", "template_id",
              "paraphrase_template_ids", "subject_kind", "locality_kinds", "source_format", "generation_prompts",
              "attribute_prompts",
              # zsRE's own keys (the reader keeps them), and a kind label for a user's own sets
              "answers", "loc_ans", "pred", "cond", "kind")


def unknown_keys(case: "EditCase") -> list[str]:
    """The case's keys that are neither schema fields nor known metadata."""
    return sorted(k for k in case.meta if k not in KNOWN_META)


def _check_prompt_list(value: Any, key: str) -> list[str]:
    """Validate an optional list of prompts; return it as a fresh list."""
    if not isinstance(value, list):
        raise DataError(
            f'"{key}" must be a list of strings, got {type(value).__name__}; '
            f'write it as ["..."] or leave the key out'
        )
    for i, item in enumerate(value):
        if not isinstance(item, str) or not visible(item):
            raise DataError(
                f'"{key}"[{i}] must be a non-empty string, got {item!r}; '
                f"remove the entry or give the prompt text"
            )
    return list(value)


def _check_text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f'"{key}" must be a string, got {type(value).__name__} {value!r}')
    if not visible(value):
        raise DataError(f'"{key}" is empty or only invisible characters (spaces, zero-width or '
                        f'direction marks); give the {"prompt" if key == "input" else "new answer"} text')
    return value


@dataclass
class EditCase:
    """One requested edit: make the model continue ``input`` with ``target``.

    ``paraphrases`` are rewordings of ``input`` that should now also yield ``target``
    (generalisation); ``locality`` are unrelated prompts whose answers must not change.
    ``meta`` holds every other key of the record (subject, relation, true_target...).
    """

    input: str
    target: str
    paraphrases: list[str] = field(default_factory=list)
    locality: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validate on construction too, so that a case built in code cannot be written out
        # in a form read_jsonl would later refuse.
        _check_text(self.input, "input")
        _check_text(self.target, "target")
        self.paraphrases = _check_prompt_list(self.paraphrases, "paraphrases")
        self.locality = _check_prompt_list(self.locality, "locality")
        if not isinstance(self.meta, dict):
            raise DataError(f"meta must be a dict, got {type(self.meta).__name__}")
        clash = sorted(k for k in self.meta if k in CORE_FIELDS or k == "meta")
        if clash:
            # to_dict flattens meta into the record, so these would overwrite real fields.
            raise DataError(f"meta keys {clash} clash with the record's own fields; rename them")
        for k in self.meta:
            if not isinstance(k, str):
                raise DataError(f"meta key {k!r} must be a string")

    @property
    def prompt_target(self) -> str:
        """The input and target joined the way the model sees them."""
        return join_prompt(self.input, self.target)

    @classmethod
    def from_dict(cls, d: Any) -> "EditCase":
        """Build from a record; unknown keys go to ``meta``. Raises DataError (no location)."""
        if not isinstance(d, dict):
            raise DataError(
                f"each record must be a JSON object, got {type(d).__name__}; "
                'write it as {"input": ..., "target": ...}'
            )
        for key in ("input", "target"):
            if key not in d:
                raise DataError(f'missing required key "{key}"; every record needs "input" and "target"')
        meta = {k: v for k, v in d.items() if k not in CORE_FIELDS}
        if "meta" in meta:
            raise DataError('"meta" is a reserved key; put metadata keys at the top level of the record')
        return cls(
            input=_check_text(d["input"], "input"),
            target=_check_text(d["target"], "target"),
            paraphrases=_check_prompt_list(d["paraphrases"], "paraphrases") if "paraphrases" in d else [],
            locality=_check_prompt_list(d["locality"], "locality") if "locality" in d else [],
            meta=meta,
        )

    def to_dict(self) -> dict[str, Any]:
        """Record form: core fields first in a fixed order, then meta keys sorted.

        The fixed order (rather than json.dumps(sort_keys=True)) keeps the human-relevant
        fields at the start of every line while staying deterministic.
        """
        out: dict[str, Any] = {
            "input": self.input,
            "target": self.target,
            "paraphrases": list(self.paraphrases),
            "locality": list(self.locality),
        }
        for k in sorted(self.meta):
            out[k] = self.meta[k]
        return out


def join_prompt(prompt: str, target: str) -> str:
    """Join a prompt and its target with one space, unless the target brings its own.

    Tokenizers such as GPT-2's and Llama's attach the leading space to the first target
    token, so "Paris" after "is" must be scored as " Paris"; a target that already starts
    with white space (CounterFact-style " Paris", or a newline) is taken as given.
    """
    if target[:1].isspace():
        return prompt + target
    return prompt + " " + target


def _line_error(path: Path, lineno: int, err: DataError) -> DataError:
    return DataError(err.reason, path=path, line=lineno)


def read_jsonl(path: str | os.PathLike) -> list[EditCase]:
    """Read edit cases from a JSONL file in the schema above.

    Blank lines are skipped. Any bad line raises :class:`DataError` naming the file and the
    1-based line number and saying what to change; a file with no record at all is an error
    too (an empty batch is almost always a wrong path or a failed export).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError("no such file; check the path", path=p) from None
    except IsADirectoryError:
        raise DataError("is a directory; give the path of a .jsonl file", path=p) from None
    except OSError as e:
        raise DataError(f"cannot read the file: {e.strerror or e}", path=p) from None

    cases: list[EditCase] = []
    # Split on "\n" only (not str.splitlines, which also breaks on U+2028 etc. inside JSON
    # strings) so that line numbers match what an editor shows.
    for lineno, bline in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1 and bline.startswith(b"\xef\xbb\xbf"):
            bline = bline[3:]  # tolerate a UTF-8 byte-order mark written by some editors
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8",
                            path=p, line=lineno) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON ({e.msg} at column {e.colno}); each line must be one complete JSON object",
                path=p, line=lineno,
            ) from None
        try:
            cases.append(EditCase.from_dict(obj))
        except DataError as e:
            if isinstance(obj, dict) and "input" not in obj and ("src" in obj or "requested_rewrite" in obj):
                # The commonest mistake: a zsRE or CounterFact file given as mendctl JSONL.
                kind = "zsRE" if "src" in obj else "CounterFact"
                e = DataError(f"{e.reason} (this looks like {kind} data: read it with "
                              f"read_cases(), which detects the format)")
            raise _line_error(p, lineno, e) from None
    if not cases:
        raise DataError('no edit cases in the file; write one JSON object per line with "input" and "target"',
                        path=p)
    return cases


def dumps_case(case: EditCase) -> str:
    """One case as one JSON line (no newline), in the canonical field order."""
    # ensure_ascii=False keeps city names such as "São Paulo" readable; separators are the
    # json defaults, spelled out because byte-identical output depends on them.
    return json.dumps(case.to_dict(), ensure_ascii=False, sort_keys=False, separators=(", ", ": "))


def write_jsonl(path: str | os.PathLike, cases: Iterable[EditCase]) -> None:
    """Write cases as JSONL, deterministically: same cases -> byte-identical file.

    UTF-8, "\\n" line endings on every platform, canonical field order. The file is written
    to a temporary name and renamed into place, so a crash never leaves half a file.
    """
    p = Path(path)
    lines = []
    for i, c in enumerate(cases):
        if not isinstance(c, EditCase):
            raise TypeError(f"cases[{i}] is {type(c).__name__}, expected EditCase")
        lines.append(dumps_case(c) + "\n")
    data = "".join(lines).encode("utf-8")
    p.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling name opened with "x" (not tempfile.mkstemp, whose 0600 mode would
    # leave the final file unreadable to others regardless of the umask).
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
