"""Other names of what a gate reads (mendctl/editors/aliases.py) and how gates use them
(editors/route.py: `WordIndex`, `KeyTable` groups, `same_names`)."""
from __future__ import annotations

import torch

from mendctl.editors import aliases, route


def test_a_countrys_demonym_and_other_names_are_its_alternatives():
    india = aliases.alternatives(("India",))
    assert ("Indian",) in india and ("Bharat", "Ganrajya") in india
    assert ("India",) in aliases.alternatives(("Indian",))
    uk = aliases.alternatives(("United", "Kingdom"))
    assert {("British",), ("UK",), ("Britain",)} <= set(uk)
    assert ("United", "Kingdom") in aliases.alternatives(("UK",))
    assert {("American",), ("US",), ("USA",), ("America",)} <= set(aliases.alternatives(("United", "States")))
    assert ("Dutch",) in aliases.alternatives(("Netherlands",))
    assert ("Indians",) in india and ("Dutchs",) not in aliases.alternatives(("Netherlands",))
    # the longest name the words hold is the one rewritten: "Republic of India" as a whole
    assert ("India",) in aliases.alternatives(("Republic", "India"))
    # other names beside it are kept
    assert ("Narendra", "Indian") in aliases.alternatives(("Narendra", "India"))


def test_what_is_no_name_of_a_country_is_left_out():
    for words in [("Narendra", "Modi"), ("Camp", "Nou"), ()]:
        assert aliases.alternatives(words) == ()
    france = aliases.alternatives(("France",))
    # a spelling with a lowercase word ("République française") would open on "République"
    # alone, and ISO codes ("FR", "FRA") are no names: neither is an alternative
    assert ("French",) in france and all(len(ws) > 1 or ws[0] not in ("République", "FR", "FRA")
                                         for ws in france)
    # a demonym that countries of comparable size share goes to none of them
    groups = aliases.country_groups()
    congolese = [g for g in groups if ("Congolese",) in g]
    assert len(congolese) <= 1
    # (every alternative is a name's word set, never one that holds the words themselves)
    for words in [("India",), ("United", "Kingdom"), ("Germany",)]:
        assert all(not set(words) <= set(a) for a in aliases.alternatives(words))
        assert len(aliases.alternatives(words)) <= aliases.MAX_ALTERNATIVES


def test_a_company_name_without_its_legal_form():
    assert aliases.alternatives(("Apple", "Inc")) == (("Apple",),)
    assert aliases.alternatives(("Inc",)) == ()
    assert aliases.name_words("Republic of the Congo") == ("Republic", "Congo")


INDEX = dict(words=[("India",), ("Zorblax", "Quintrell"), ("silver",), ("United", "Kingdom")],
             folds=[False, False, True, False],
             aliases=[(("Indian",), ("Bharat", "Ganrajya")), (), (("Argentum",),),
                      (("UK",), ("British",), ("Great", "Britain"))])


def test_word_index_opens_an_edit_by_any_of_its_word_sets_at_the_first():
    index = route.WordIndex(**INDEX)
    assert index.opened("Who is the Indian prime minister?") == {0: len("Who is the Indian ")}
    text = "Bharat Ganrajya, also India, has"
    assert index.opened(text) == {0: len("Bharat Ganrajya")}
    assert index.opened("Who is India's PM?") == {0: len("Who is India")}
    assert index.opened("Bharat has") == {}  # an alias needs all its words, as words do
    assert index.opened("Indiana is") == {}  # whole words only
    # a gate whose words match in any case (`fold`) keeps its aliases as written
    assert index.opened("the silver is") == {2: len("the silver")}
    assert index.opened("Argentum is") == {2: len("Argentum ")} and index.opened("argentum is") == {}
    assert route.WordIndex(["India"], [True], [(("Indian",),)]).opened("the indian ocean") == {}
    assert index.opened("Zorblax Quintrell and the Indian") == {1: len("Zorblax Quintrell")}
    # an index without aliases reads as before
    assert route.WordIndex([("India",)]).opened("the Indian PM is") == {}


def test_a_one_word_alias_opens_only_where_it_is_not_the_first_word_of_another_name():
    index = route.WordIndex(**INDEX)
    for text in ("What is the deepest point of the Indian Ocean?", "Where is the British Museum?",
                 "the UK Parliament is", "the Indian"):
        assert index.opened(text) == {}, text
    assert index.opened("Who is the Indian PM?") == {0: len("Who is the Indian PM")}  # an acronym
    assert index.opened("Indian, he said") == {0: len("Indian")}
    assert index.opened("the Great Britain team") == {3: len("the Great Britain")}  # (two words)
    assert index.opened("the Indian Ocean and India are") == {0: len("the Indian Ocean and India")}


def test_a_one_word_alias_before_the_edits_own_relation_as_a_title():
    """`titled`: "the French President" is the office the edit of "Who is the president of
    France?" is about, not another name starting with "French" ("the French Revolution")."""
    france = aliases.alternatives(("France",))
    extra = aliases.titled(france, ["president"])
    assert extra == (("French", "President"),)
    index = route.WordIndex([("France",)], None, [france + extra])
    assert index.opened("Who is the French President?") == {0: len("Who is the French President")}
    assert index.opened("When did the French Revolution begin?") == {}
    assert route.WordIndex([("France",)], None, [france]).opened("Who is the French President?") == {}
    assert aliases.titled((("UK",), ("Great", "Britain")), ["capital"]) == (("UK", "Capital"),)


def test_word_index_openings_are_causal():
    """An edit opens at the same offset in a text and in every longer text that begins with
    it, and not before: a token's gates depend on the text up to it only, so scoring a prompt
    and generating from it see the same gates."""
    index = route.WordIndex(**INDEX)
    for text in ("Who is the Indian PM? The Indian Ocean is deep, said the UK man.",
                 "the Indian Ocean and India are, as UK Parliament says, British, Indian (Asian)",
                 "Argentum Zorblax Quintrell; the Great Britain team"):
        full = index.opened(text)
        for n in range(len(text) + 1):
            assert index.opened(text[:n]) == {i: o for i, o in full.items() if o < n}, text[:n]


def _gate(words, aliases_=(), relation=True):
    rel = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1) if relation else None
    return route.Gate(torch.zeros(0, 8), tuple(words), relation=rel, aliases=tuple(aliases_))


def test_gates_that_share_a_way_of_writing_their_subject_are_chosen_among_together():
    torch.manual_seed(0)
    india = _gate(("India",), aliases.alternatives(("India",)))
    indian = _gate(("Indian",), aliases.alternatives(("Indian",)))
    old = _gate(("India",))  # an entry made before aliases
    france = _gate(("France",), aliases.alternatives(("France",)))
    french_old = _gate(("French",))
    assert route.same_names(india, indian) and route.same_names(old, indian)
    assert not route.same_names(france, india) and route.same_names(french_old, france)
    table = route.KeyTable.of_gates([india, france, indian, old, french_old])
    assert sorted(table.groups) == [(0, 2, 3), (1, 4)]  # each in gate order: the later wins a tie
    # gates without aliases group by their words alone, as before
    assert route.KeyTable.of_gates([old, _gate(("India",)), _gate(("Indian",))]).groups == ((0, 1),)
