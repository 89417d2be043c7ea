"""Tests of mendctl.editors.data: schema, bundled dataset, readers, generic text.

The dataset is built once per session into a temporary directory (about a second) and
shared; the determinism tests build again to compare bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mendctl.editors.data import (
    DEFAULT_SEED,
    DataError,
    EditCase,
    build_dataset,
    generic_text_samples,
    join_prompt,
    load_split,
    read_cases,
    read_counterfact,
    read_jsonl,
    read_zsre,
    write_jsonl,
)
from mendctl.editors.data.build import SPLITS
from mendctl.editors.data.templates import RELATIONS

FIXTURES = Path(__file__).parent / "fixtures" / "data"
FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "heldout.jsonl", "summary.json")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds-seed0")
    summary = build_dataset(out, seed=DEFAULT_SEED)
    splits = {s: read_jsonl(out / f"{s}.jsonl") for s in SPLITS}
    return out, summary, splits


# --- schema -------------------------------------------------------------------------------


def test_join_prompt():
    assert join_prompt("The capital of France is", "Paris") == "The capital of France is Paris"
    assert join_prompt("The capital of France is", " Paris") == "The capital of France is Paris"
    assert join_prompt("Q:", "\nA") == "Q:\nA"


def test_roundtrip_and_field_order(tmp_path):
    cases = [
        EditCase("Who is India's PM?", "Narendra Modi", ["Who is the prime minister of India?"],
                 ["Where in the US is Raleigh?"], {"zeta": 1, "alpha": "São Paulo"}),
        EditCase("The capital of France is", "Rome"),
    ]
    p = tmp_path / "c.jsonl"
    write_jsonl(p, cases)
    raw = p.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw
    first = raw.split(b"\n")[0].decode("utf-8")
    assert list(json.loads(first)) == ["input", "target", "paraphrases", "locality", "alpha", "zeta"]
    assert "São Paulo" in first  # ensure_ascii=False
    back = read_jsonl(p)
    assert back == cases
    write_jsonl(tmp_path / "d.jsonl", back)
    assert (tmp_path / "d.jsonl").read_bytes() == raw


def test_from_dict_keeps_meta_and_defaults():
    c = EditCase.from_dict({"input": "a", "target": "b", "subject": "x", "relation": "r"})
    assert c.paraphrases == [] and c.locality == []
    assert c.meta == {"subject": "x", "relation": "r"}
    assert c.to_dict() == {"input": "a", "target": "b", "paraphrases": [], "locality": [],
                           "relation": "r", "subject": "x"}


@pytest.mark.parametrize(
    "bad, needle",
    [
        ('{"input": "a", "target": ', "invalid JSON"),
        ('["input", "target"]', "JSON object"),
        ('{"target": "b"}', '"input"'),
        ('{"input": "a"}', '"target"'),
        ('{"input": "", "target": "b"}', '"input" is empty'),
        ('{"input": "   ", "target": "b"}', '"input" is empty'),
        ('{"input": "a", "target": " \\t"}', '"target" is empty'),
        ('{"input": "a", "target": 3}', '"target" must be a string'),
        ('{"input": 3, "target": "b"}', '"input" must be a string'),
        ('{"input": "a", "target": "b", "paraphrases": "c"}', '"paraphrases" must be a list'),
        ('{"input": "a", "target": "b", "paraphrases": ["ok", ""]}', '"paraphrases"[1]'),
        ('{"input": "a", "target": "b", "locality": [1]}', '"locality"[0]'),
        ('{"input": "a", "target": "b", "locality": null}', '"locality" must be a list'),
    ],
)
def test_read_jsonl_errors_name_line(tmp_path, bad, needle):
    p = tmp_path / "bad.jsonl"
    good = '{"input": "The capital of France is", "target": "Rome"}'
    p.write_text(f"{good}\n\n{good}\n{bad}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        read_jsonl(p)
    msg = str(ei.value)
    assert f"{p}:4:" in msg, msg  # blank line 2 still counts: numbers match an editor's
    assert needle in msg, msg
    assert ei.value.line == 4


def test_read_jsonl_empty_and_missing(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no edit cases"):
        read_jsonl(p)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    assert issubclass(DataError, ValueError)


def test_editcase_validates_on_construction():
    with pytest.raises(DataError):
        EditCase("", "x")
    with pytest.raises(DataError, match="clash"):
        EditCase("a", "b", meta={"input": "c"})


# --- bundled dataset ------------------------------------------------------------------------


def test_same_seed_byte_identical_and_other_seed_differs(built, tmp_path):
    out0, _, _ = built
    again = tmp_path / "again"
    build_dataset(again, seed=DEFAULT_SEED)
    for name in FILES:
        assert (out0 / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "seed1"
    build_dataset(other, seed=1)
    assert (out0 / "train.jsonl").read_bytes() != (other / "train.jsonl").read_bytes()
    assert (out0 / "test.jsonl").read_bytes() != (other / "test.jsonl").read_bytes()
    assert (out0 / "heldout.jsonl").read_bytes() != (other / "heldout.jsonl").read_bytes()


def test_summary_counts_and_hashes(built):
    import hashlib

    out, summary, splits = built
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == summary
    for s in SPLITS:
        assert summary["counts"][s]["total"] == len(splits[s])
        assert summary["sha256"][f"{s}.jsonl"] == hashlib.sha256((out / f"{s}.jsonl").read_bytes()).hexdigest()


def test_size_and_relations(built):
    from mendctl.editors.data.templates import HELDOUT_RELATIONS, SUBJECT_KINDS

    _, summary, splits = built
    assert len(RELATIONS) >= 30
    assert len(SUBJECT_KINDS) >= 6
    seen = {c.meta["relation"] for s in ("train", "val", "test") for c in splits[s]}
    held = {c.meta["relation"] for c in splits["heldout"]}
    assert seen | held == set(RELATIONS)
    assert held == set(HELDOUT_RELATIONS) and 5 <= len(held) <= 10
    assert not seen & held  # heldout relations never appear in train/val/test
    assert summary["heldout"]["relations"] == list(HELDOUT_RELATIONS)
    kind = summary["heldout"]["subject_kind"]
    assert {c.meta["subject_kind"] for c in splits["heldout"]} > {kind}
    assert not any(c.meta["subject_kind"] == kind for s in ("train", "val", "test") for c in splits[s])
    assert len({c.meta["subject_kind"] for c in splits["train"]}) >= 6
    assert len(splits["train"]) >= 8000
    assert len(splits["heldout"]) >= 500
    n = sum(len(splits[s]) for s in ("train", "val", "test"))
    for s in ("val", "test"):
        assert len(splits[s]) >= 300
        assert 0.07 <= len(splits[s]) / n <= 0.13
    for s in SPLITS:  # balance: no relation dominates a split
        for r in RELATIONS:
            assert summary["counts"][s][r] <= 500
    # Every seen relation is in val and test unless all its subjects are one big group.
    for s in ("val", "test"):
        missing = seen - {c.meta["relation"] for c in splits[s]}
        assert all(len({c.meta["group"] for c in splits["train"] if c.meta["relation"] == r}) == 1
                   for r in missing), missing


def test_templates_have_question_forms():
    from mendctl.editors.data.templates import is_question

    for name, rel in RELATIONS.items():
        assert len(rel.templates) >= 10, name
        share = sum(is_question(t) for t in rel.templates) / len(rel.templates)
        assert 0.35 <= share <= 0.65, (name, share)
        assert 2 <= len(rel.held_out) <= 4, name
    forms = ["Who is", "What is", "Which", "Where is", "When was"]
    everything = [t for rel in RELATIONS.values() for t in rel.templates]
    for form in forms:
        assert any(t.startswith(form) and t.endswith("?") for t in everything), form


def test_inputs_mix_questions_and_statements(built):
    from mendctl.editors.data.templates import is_question

    _, _, splits = built
    for s in SPLITS:
        share = sum(is_question(c.input) for c in splits[s]) / len(splits[s])
        assert 0.4 <= share <= 0.6, (s, share)
        ids = {c.meta["template_id"] for c in splits[s]}
        assert len(ids) >= 5


def test_cases_are_well_formed(built):
    _, _, splits = built
    required = {"case_id", "group", "relation", "subject", "subject_kind", "true_target",
                "template_id", "paraphrase_template_ids", "locality_kinds"}
    for s, cases in splits.items():
        for c in cases:
            m = c.meta
            assert required <= set(m), c
            assert c.target != m["true_target"], c
            assert c.target.strip() == c.target and c.target
            assert 2 <= len(c.paraphrases) <= 3
            assert 4 <= len(c.locality) <= 5, c
            assert c.input not in c.paraphrases
            assert c.input not in c.locality
            rel = RELATIONS[m["relation"]]
            assert m["subject_kind"] == rel.subject_kind
            assert m["template_id"] not in rel.held_out
            assert c.input == rel.render(m["template_id"], m["subject"])
            assert c.paraphrases == [rel.render(i, m["subject"]) for i in m["paraphrase_template_ids"]]
            assert m["template_id"] not in m["paraphrase_template_ids"]


def test_locality_kinds(built):
    from mendctl.editors.data.facts import load_facts

    _, _, splits = built
    relations_of: dict[str, set[str]] = {}
    for f in load_facts().facts:
        relations_of.setdefault(f.subject, set()).add(f.relation)
    for s, cases in splits.items():
        # the prompts each subject/relation pair of this split can give
        prompts: dict[str, tuple[str, str]] = {}
        for c in cases:
            for p in [c.input, *c.paraphrases]:
                prompts[p] = (c.meta["relation"], c.meta["subject"])
        n_same = 0
        for c in cases:
            kinds = c.meta["locality_kinds"]
            assert len(kinds) == len(c.locality)
            assert set(kinds) <= {"neighbour", "other", "same_subject"}
            assert 1 <= kinds.count("neighbour") <= 2 and 1 <= kinds.count("other") <= 3
            assert kinds.count("same_subject") <= 1
            for p, k in zip(c.locality, kinds):
                if k == "same_subject":
                    assert c.meta["subject"].lower() in p.lower()
                if p in prompts:  # a prompt that is another case's wording: check its roles
                    r, subj = prompts[p]
                    if k == "neighbour":
                        assert r == c.meta["relation"] and subj != c.meta["subject"]
                    elif k == "other":
                        assert r != c.meta["relation"] and subj != c.meta["subject"]
                    else:
                        assert r != c.meta["relation"] and subj == c.meta["subject"]
            n_same += "same_subject" in kinds
        assert n_same >= 0.3 * len(cases), (s, n_same)


def test_counterfactual_never_any_true_value(built):
    """Stronger than target != true_target: e.g. never another real neighbour or language."""
    from mendctl.editors.data.facts import load_facts
    from mendctl.editors.data.templates import country_mid

    _, _, splits = built
    data = load_facts()
    truth = {(f.relation, f.subject): f.true_values for f in data.facts}
    for cases in splits.values():
        for c in cases:
            r = c.meta["relation"]
            values = truth[(r, c.meta["subject"])]
            assert c.target not in values | {country_mid(v) for v in values}, c
            # of the right type: a value of the same relation's pool
            assert c.target in set(data.pools[r]) | {country_mid(v) for v in data.pools[r]}, c


def test_split_by_subject_and_group(built):
    _, summary, splits = built
    seen = ("train", "val", "test")
    subj = {s: {c.meta["subject"] for c in splits[s]} for s in seen}
    groups = {s: {c.meta["group"] for c in splits[s]} for s in seen}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not subj[a] & subj[b], (a, b)
        assert not groups[a] & groups[b], (a, b)
    # Locality prompts name only subjects of their own split: no test subject ever appears in
    # a training prompt, not even as a locality probe.
    for s in ("val", "test"):
        wordings = {RELATIONS[r].render(i, c.meta["subject"]) for c in splits[s]
                    for r in RELATIONS for i in range(len(RELATIONS[r].templates))}
        train_prompts = {p for c in splits["train"] for p in [c.input, *c.paraphrases, *c.locality]}
        assert not wordings & train_prompts, s


def test_templates_and_held_out(built):
    _, summary, splits = built
    for name, rel in RELATIONS.items():
        assert len(rel.templates) >= 10
        assert len(rel.held_out) >= 2 and 0 not in rel.held_out
        assert summary["relations"][name]["held_out_template_ids"] == list(rel.held_out)
    for s in SPLITS:
        for c in splits[s]:
            held = set(RELATIONS[c.meta["relation"]].held_out)
            ids = set(c.meta["paraphrase_template_ids"])
            if s in ("test", "heldout"):
                assert ids <= held, c
            else:
                assert not ids & held, c
    # Held-out wordings never appear verbatim in train or val.
    held_prompts = {RELATIONS[c.meta["relation"]].render(i, c.meta["subject"])
                    for c in splits["train"] for i in RELATIONS[c.meta["relation"]].held_out}
    seen = {p for c in splits["train"] + splits["val"] for p in [c.input, *c.paraphrases, *c.locality]}
    assert not held_prompts & seen


def test_sources_recorded(built):
    from importlib import resources

    _, summary, _ = built
    notes = resources.files("mendctl.editors.data").joinpath("resources", "SOURCES.md").read_text(encoding="utf-8")
    used = {RELATIONS[r].source for r in RELATIONS}
    for dist, info in summary["sources"].items():
        if dist == "city_min_population":
            continue
        assert info["version"] != "unknown" and info["license"], dist
        assert dist in notes, dist
    for src in used:
        for part in src.split("+"):
            assert part in summary["sources"], part


def test_load_split_caches(tmp_path, built):
    out0, _, splits = built
    d = tmp_path / "cache"
    test = load_split("test", seed=DEFAULT_SEED, cache_dir=d)
    assert test == splits["test"]
    assert (d / "test.jsonl").read_bytes() == (out0 / "test.jsonl").read_bytes()
    mtime = (d / "summary.json").stat().st_mtime_ns
    assert load_split("val", cache_dir=d) == splits["val"]
    assert (d / "summary.json").stat().st_mtime_ns == mtime  # not rebuilt
    (d / "val.jsonl").write_text("corrupt\n", encoding="utf-8")
    assert load_split("val", cache_dir=d) == splits["val"]  # a damaged cache is rebuilt
    assert load_split("heldout", cache_dir=d) == splits["heldout"]
    with pytest.raises(ValueError, match="unknown split"):
        load_split("dev", cache_dir=d)


# --- readers ----------------------------------------------------------------------------------


def test_read_zsre_jsonl_and_array():
    cases = read_zsre(FIXTURES / "zsre_small.jsonl")
    assert len(cases) == 3
    c = cases[0]
    assert c.input == "What university did Watts Humphrey attend?"
    assert c.target == "University of Michigan"
    assert c.paraphrases == ["What university did Watts Humphrey take part in?"]
    assert c.locality == ["who played desmond doss father in hacksaw ridge"]
    assert c.meta["subject"] == "Watts Humphrey"
    assert c.meta["true_target"] == "Illinois Institute of Technology"
    arr = read_zsre(FIXTURES / "zsre_small.json")
    assert [x.input for x in arr] == [x.input for x in cases[:2]]
    assert read_cases(FIXTURES / "zsre_small.jsonl") == cases
    assert read_cases(FIXTURES / "zsre_small.json") == arr


def test_read_counterfact():
    cases = read_counterfact(FIXTURES / "counterfact_small.json")
    assert len(cases) == 2
    c = cases[0]
    assert c.input == "The mother tongue of Danielle Darrieux is"
    assert c.target == "English"
    assert join_prompt(c.input, c.target) == "The mother tongue of Danielle Darrieux is English"
    assert len(c.paraphrases) == 2 and len(c.locality) == 3
    assert c.meta["true_target"] == "French" and c.meta["case_id"] == 0
    assert c.meta["relation"] == "P103"
    assert cases[1].input == "Toko Yasuda is a native speaker of"
    assert read_cases(FIXTURES / "counterfact_small.json") == cases


def test_read_cases_own_schema():
    cases = read_cases(FIXTURES / "cases_small.jsonl")
    assert cases == read_jsonl(FIXTURES / "cases_small.jsonl")
    assert cases[1].meta == {"subject": "France", "relation": "capital", "true_target": "Paris"}
    with pytest.raises(ValueError, match="unknown format"):
        read_cases(FIXTURES / "cases_small.jsonl", format="csv")


def test_reader_errors_name_record(tmp_path):
    cf = json.loads((FIXTURES / "counterfact_small.json").read_text(encoding="utf-8"))
    del cf[1]["requested_rewrite"]["target_new"]
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(cf), encoding="utf-8")
    with pytest.raises(DataError, match=r"record \[1\].*target_new") as ei:
        read_counterfact(p)
    assert ei.value.record == 1

    lines = (FIXTURES / "zsre_small.jsonl").read_text(encoding="utf-8").split("\n")
    rec = json.loads(lines[1])
    rec["alt"] = ""
    lines[1] = json.dumps(rec)
    p = tmp_path / "z.jsonl"
    p.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r'z\.jsonl:2: "alt"'):
        read_zsre(p)
    with pytest.raises(DataError, match=r'z\.jsonl:2: "alt"'):
        read_cases(p)

    p = tmp_path / "empty.json"
    p.write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        read_cases(p)


REAL_ZSRE = Path(__file__).parent.parent / "bench" / "data" / "zsre_real.json"


def test_real_world_zsre_file():
    # bench/data/zsre_real.json: hand-written real-world edits in MEND's zsRE format.
    cases = read_zsre(REAL_ZSRE)
    assert read_cases(REAL_ZSRE) == cases  # sniffed as zsRE
    assert len(cases) == 80
    kinds = {"office", "company", "sport", "work", "science", "place", "date", "language"}
    for c in cases:
        subject = c.meta["subject"]
        assert c.meta["source_format"] == "zsre"
        assert c.meta["kind"] in kinds, c.input
        assert len(c.paraphrases) >= 2, c.input
        assert len(set(c.paraphrases)) == len(c.paraphrases) and c.input not in c.paraphrases
        assert len(c.locality) == 1 and not c.locality[0].lower().startswith("nq question:"), c.input
        assert subject in c.input, c.input
        assert all(subject in p for p in c.paraphrases), c.input
        assert c.target != c.meta["true_target"], c.input
        assert c.meta["loc_ans"]
    inputs = [c.input for c in cases]
    assert len(set(inputs)) == len(inputs)
    assert len({c.meta["kind"] for c in cases}) >= 6
    assert {c.meta["kind"] for c in cases} == kinds


def test_real_world_aliases_file():
    # bench/data/aliases_real.json: country facts whose paraphrases name the country another
    # way (editors/aliases.py knows that way) and whose locality question uses its demonym
    from mendctl.editors.aliases import alternatives, name_words

    cases = read_cases(REAL_ZSRE.with_name("aliases_real.json"))
    assert len(cases) == 24 and len({c.input for c in cases}) == 24
    known = []
    for c in cases:
        subject = c.meta["subject"]
        assert c.meta["source_format"] == "zsre" and subject in c.input, c.input
        assert c.target != c.meta["true_target"] and c.meta["loc_ans"], c.input
        other = alternatives(name_words(subject))

        def says(words, text):
            return all(re.search(rf"\b{re.escape(w)}\b", text) for w in words)
        named = [p for p in c.paraphrases if not says([subject], p)]
        assert named and not says([subject], c.locality[0]), c.input
        known.append(all(any(says(ws, p) for ws in other) for p in named + c.locality))
    # (all but Argentina's "Argentine": countryinfo's demonym is "Argentinean")
    assert sum(known) == len(cases) - 1


# --- generic text -------------------------------------------------------------------------------


def test_generic_text_samples():
    texts = generic_text_samples()
    assert 50 <= len(texts) <= 100
    assert 20_000 <= sum(len(t) for t in texts) <= 60_000
    for t in texts:
        assert 40 <= len(t.split()) <= 120
        assert not t.startswith("#")
    assert generic_text_samples(3) == texts[:3]
    assert generic_text_samples(10_000) == texts
    with pytest.raises(ValueError):
        generic_text_samples(-1)


def test_read_jsonl_hints_at_other_formats(tmp_path):
    with pytest.raises(DataError, match="zsRE"):
        read_jsonl(FIXTURES / "zsre_small.jsonl")
    p = tmp_path / "broken.json"
    p.write_text('[\n  {"input": "a", "target": "b"},\n  {"input": "a" "target": "b"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        read_cases(p)
