"""Build the bundled CounterFact-style edit dataset, and load its splits from a cache.

This module owns turning the true facts of :mod:`.facts` into edit cases and writing them
(docs/data.md describes the result):

* one case per (relation, subject), at most ``CAP`` per relation and split: ``input`` a
  seeded open wording (question or statement), ``target`` a counterfactual value of the
  same type (never any true value for that subject), ``paraphrases`` 2-3 other wordings,
  ``locality`` 4-5 prompts (neighbours, other relations, the same subject under another
  relation; ``meta["locality_kinds"]``), all from the same split;
* train/val/test split by group (a country with its places, a company, a person), about
  80/10/10, so every test subject is unseen in training; ``heldout`` holds whole relations
  (``HELDOUT_RELATIONS``) never seen in the other three;
* test and heldout paraphrases use only the held-out templates of :mod:`.templates`, train
  and val never do;
* files ``train.jsonl``, ``val.jsonl``, ``test.jsonl``, ``heldout.jsonl`` and
  ``summary.json`` (counts and sha256 of each file, sources, relations).

Determinism: one ``random.Random(seed)`` drives every choice, in a fixed order over sorted
data, so the same seed gives byte-identical files on any machine and hash seed (as long as
the source package versions, recorded in the summary, are the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from .facts import Fact, load_facts
from .schema import DataError, EditCase, read_jsonl, write_jsonl
from .templates import HELDOUT_KIND, HELDOUT_RELATIONS, RELATION_NAMES, RELATIONS, country_mid

__all__ = ["build_dataset", "load_split", "DEFAULT_SEED", "SPLITS", "FORMAT_VERSION", "SUMMARY_FILE"]

DEFAULT_SEED = 0
SPLITS = ("train", "val", "test", "heldout")
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SUMMARY_FILE = "summary.json"
# Bump when the construction changes, so cached copies built by an older mendctl are rebuilt.
FORMAT_VERSION = 2
# Cases per relation and split at most, so that city -> country (5,600 cities) does not
# dominate: train keeps <= 500, val and test <= 64 (about 1/8 of train), heldout <= 150.
CAP = {"train": 500, "val": 64, "test": 64, "heldout": 150}

_SUBJECT_SPLITS = ("train", "val", "test")


def _target_text(relation: str, value: str) -> str:
    return country_mid(value) if RELATIONS[relation].value_kind == "country" else value


def _split_groups(facts: list[Fact], rng: random.Random) -> dict[str, str]:
    """Assign each group (country, company, person...) to train/val/test, aiming at 80/10/10.

    Group sizes are very uneven (the United States has hundreds of cities and airports, a
    company or a person a handful of facts), so groups are not drawn with fixed
    probabilities. Groups are visited in a seeded random order and each goes to the split
    where adding it brings the shares closest to 80/10/10, measured separately per subject
    kind (otherwise val and test fill up with one kind). A group larger than a quarter of a
    10 % split in any kind always goes to train, because alone it would dominate val or test.
    """
    dims = tuple(dict.fromkeys(RELATIONS[f.relation].subject_kind for f in facts))
    sizes: dict[str, dict[str, int]] = {}
    for f in facts:
        sizes.setdefault(f.group, {k: 0 for k in dims})[RELATIONS[f.relation].subject_kind] += 1
    total = {d: max(1, sum(sz[d] for sz in sizes.values())) for d in dims}
    filled = {s: {d: 0 for d in dims} for s in _SUBJECT_SPLITS}
    assign: dict[str, str] = {}

    def put(g: str, s: str) -> None:
        assign[g] = s
        for d in dims:
            filled[s][d] += sizes[g][d]

    for g in sorted(sizes):
        if any(sizes[g][d] > 0.25 * SPLIT_FRACTIONS["test"] * total[d] for d in dims):
            put(g, "train")
    rest = sorted(g for g in sizes if g not in assign)
    rng.shuffle(rest)

    def cost_increase(g: str, s: str) -> float:
        # Change in the squared relative deviation from the target share if g goes to s.
        c = 0.0
        for d in dims:
            if not sizes[g][d]:
                continue
            want = SPLIT_FRACTIONS[s] * total[d]
            before = (filled[s][d] - want) / total[d]
            after = (filled[s][d] + sizes[g][d] - want) / total[d]
            c += after * after - before * before
        return c

    for g in rest:
        # min keeps the first minimum, so ties break in split order.
        put(g, min(_SUBJECT_SPLITS, key=lambda s: cost_increase(g, s)))
    return assign


def _counterfactual(rng: random.Random, pool: list[str], exclude: frozenset[str]) -> str:
    candidates = [v for v in pool if v not in exclude]
    if not candidates:  # pragma: no cover - every pool has several values
        raise RuntimeError("no counterfactual value available")
    return rng.choice(candidates)


def _sample_other(rng: random.Random, seq: list, k: int, avoid) -> list:
    """k distinct items of ``seq`` other than ``avoid``.

    Draws k+1 and drops ``avoid``, instead of filtering the list first: the city list has
    thousands of subjects, and filtering it once per case would dominate the build.
    """
    picked = rng.sample(seq, min(k + 1, len(seq)))
    return [s for s in picked if s != avoid][:k]


def _open_prompt(rng: random.Random, rel, subject: str) -> tuple[int, str]:
    """A prompt in one of the relation's open wordings: a question half of the time."""
    ids = rel.question_ids if rng.random() < 0.5 else rel.statement_ids
    i = rng.choice(ids)
    return i, rel.render(i, subject)


def _cases_for(split: str, facts: list[Fact], pool_facts: list[Fact], rng: random.Random,
               pools: dict[str, list[str]]) -> list[EditCase]:
    """Edit cases for ``facts``; locality prompts come from ``pool_facts`` (same split)."""
    subjects = {r: sorted({f.subject for f in pool_facts if f.relation == r}) for r in RELATION_NAMES}
    present = [r for r in RELATION_NAMES if subjects[r]]
    by_subject: dict[str, list[str]] = {}
    for f in pool_facts:
        by_subject.setdefault(f.subject, []).append(f.relation)
    held_paraphrases = split in ("test", "heldout")
    out: list[EditCase] = []
    for f in facts:
        rel = RELATIONS[f.relation]
        target = _counterfactual(rng, pools[f.relation], f.true_values)

        tid, prompt = _open_prompt(rng, rel, f.subject)
        ids = list(rel.held_out) if held_paraphrases else [i for i in rel.paraphrase_ids if i != tid]
        k = min(len(ids), rng.choice((2, 3)))
        para_ids = sorted(rng.sample(ids, k))

        loc: list[str] = []
        kinds: list[str] = []
        for s in _sample_other(rng, subjects[f.relation], 2, f.subject):
            loc.append(_open_prompt(rng, rel, s)[1])
            kinds.append("neighbour")
        same = sorted(r for r in by_subject.get(f.subject, ()) if r != f.relation)
        n_other = rng.choice((1, 2)) + (0 if same else 1)
        # Other relations about other kinds of subject: unrelated questions of every kind.
        others = [r for r in present if RELATIONS[r].subject_kind != rel.subject_kind] or \
                 [r for r in present if r != f.relation]
        for r in rng.sample(others, min(n_other, len(others))):
            for s in _sample_other(rng, subjects[r], 1, f.subject):
                loc.append(_open_prompt(rng, RELATIONS[r], s)[1])
                kinds.append("other")
        if same:
            r = rng.choice(same)
            loc.append(_open_prompt(rng, RELATIONS[r], f.subject)[1])
            kinds.append("same_subject")

        out.append(EditCase(
            input=prompt,
            target=_target_text(f.relation, target),
            paraphrases=[rel.render(i, f.subject) for i in para_ids],
            locality=loc,
            meta={
                "case_id": f"{f.relation}/{f.subject}",
                "group": f.group,
                "relation": f.relation,
                "subject": f.subject,
                "subject_kind": rel.subject_kind,
                "true_target": _target_text(f.relation, f.true_target),
                "template_id": tid,
                "paraphrase_template_ids": para_ids,
                "locality_kinds": kinds,
            },
        ))
    return out


def _cap(rng: random.Random, facts: list[Fact], cap: int) -> list[Fact]:
    """At most ``cap`` facts per relation, a seeded sample; order kept."""
    by_rel: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        by_rel.setdefault(f.relation, []).append(i)
    keep: set[int] = set()
    for r in RELATION_NAMES:
        idx = by_rel.get(r, [])
        keep.update(idx if len(idx) <= cap else rng.sample(idx, cap))
    return [f for i, f in enumerate(facts) if i in keep]


def _make_cases(seed: int) -> tuple[dict[str, list[EditCase]], dict]:
    data = load_facts()
    rng = random.Random(seed)
    held = set(HELDOUT_RELATIONS)
    seen_facts = [f for f in data.facts if f.relation not in held]
    assign = _split_groups(seen_facts, rng)

    by_split: dict[str, list[Fact]] = {s: [] for s in SPLITS}
    for f in data.facts:  # data.facts is sorted (relation, group, subject)
        by_split["heldout" if f.relation in held else assign[f.group]].append(f)

    cases: dict[str, list[EditCase]] = {}
    for split in SPLITS:
        # Locality prompts come from all subjects of the same split (not only the capped
        # ones), so no test subject ever appears in a training prompt.
        chosen = _cap(rng, by_split[split], CAP[split])
        out = _cases_for(split, chosen, by_split[split], rng, data.pools)
        # Shuffle so that the first N cases of a file mix relations and subjects.
        rng.shuffle(out)
        cases[split] = out

    info = {
        "sources": data.sources,
        "relations": {
            r: {
                "description": RELATIONS[r].description,
                "subject_kind": RELATIONS[r].subject_kind,
                "value_kind": RELATIONS[r].value_kind,
                "source": RELATIONS[r].source,
                "facts": sum(1 for f in data.facts if f.relation == r),
                "templates": list(RELATIONS[r].templates),
                "held_out_template_ids": list(RELATIONS[r].held_out),
                "held_out_relation": r in held,
            }
            for r in RELATION_NAMES
        },
        "heldout": {"relations": list(HELDOUT_RELATIONS), "subject_kind": HELDOUT_KIND},
        "caps": dict(CAP),
        "groups": {s: sorted(g for g, a in assign.items() if a == s) for s in _SUBJECT_SPLITS},
    }
    return cases, info


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_dataset(out_dir: str | os.PathLike, seed: int = DEFAULT_SEED) -> dict:
    """Write train/val/test/heldout JSONL files and summary.json into ``out_dir``; return the summary.

    The summary holds the seed, format version, source package versions, counts per split
    and relation, the templates with their held-out ids, the countries of each split, and
    the sha256 of each JSONL file. Takes about a second.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases, info = _make_cases(seed)
    counts: dict[str, dict[str, int]] = {}
    sha: dict[str, str] = {}
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        write_jsonl(path, cases[split])
        sha[path.name] = _sha256(path)
        per = {r: 0 for r in RELATION_NAMES}
        for c in cases[split]:
            per[c.meta["relation"]] += 1
        per["total"] = len(cases[split])
        counts[split] = per
    summary = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "counts": counts,
        "sha256": sha,
        **info,
    }
    text = json.dumps(summary, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    # Summary last and by rename: a directory with a summary is a complete build.
    tmp = out / f".{SUMMARY_FILE}.tmp"
    tmp.write_bytes(text.encode("utf-8"))
    os.replace(tmp, out / SUMMARY_FILE)
    return summary


def default_cache_dir(seed: int = DEFAULT_SEED) -> Path:
    """``<user cache>/mendctl/data/seed-<seed>`` (platformdirs when available)."""
    try:
        from platformdirs import user_cache_dir

        base = Path(user_cache_dir("mendctl"))
    except ImportError:  # platformdirs is a mendctl dependency; keep a sane fallback anyway
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mendctl"
    return base / "data" / f"seed-{seed}"


def _cache_ok(d: Path, seed: int, split: str) -> bool:
    try:
        summary = json.loads((d / SUMMARY_FILE).read_text(encoding="utf-8"))
        name = f"{split}.jsonl"
        return (summary.get("format_version") == FORMAT_VERSION and summary.get("seed") == seed
                and summary["sha256"][name] == _sha256(d / name))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_split(name: str, seed: int = DEFAULT_SEED, cache_dir: str | os.PathLike | None = None) -> list[EditCase]:
    """Cases of split ``name`` ("train", "val", "test" or "heldout"), built once into a cache.

    ``cache_dir`` is the directory holding the files (default :func:`default_cache_dir`).
    A missing, stale (other seed or format version) or corrupted cache is rebuilt: files
    are built in a temporary sibling directory and moved in, summary last, so concurrent
    callers never read half a build.
    """
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir(seed)
    if not _cache_ok(d, seed, name):
        d.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=d))
        try:
            build_dataset(tmp, seed)
            for split in SPLITS:
                os.replace(tmp / f"{split}.jsonl", d / f"{split}.jsonl")
            os.replace(tmp / SUMMARY_FILE, d / SUMMARY_FILE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not _cache_ok(d, seed, name):  # pragma: no cover - would mean a concurrent writer of another seed
            raise DataError(f"cache directory {d} changed while building; run again", path=d)
    return read_jsonl(d / f"{name}.jsonl")
