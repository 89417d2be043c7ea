"""Relations of the bundled dataset and the prompt templates that phrase them.

This module owns the wording: for each relation, an ordered tuple of templates and which of
them are held out. Template ids are positions in that tuple and are recorded in every
case's metadata, so a test can check which wording produced which prompt.

* id 0 is the relation's main template: every case's ``input`` and every locality prompt
  use it (shared by all splits, as CounterFact does).
* the held-out ids are used only for the paraphrases of the test split; train and val
  paraphrases come from the remaining ids. This measures whether an editor generalises
  to wordings it never saw in training, not only to unseen subjects.

Templates hold ``{s}`` for the subject as it reads mid-sentence ("the Netherlands") and
``{S}`` for the subject opening a sentence ("The Netherlands"). Every template ends where
the target should follow, so ``join_prompt(prompt, target)`` reads as natural text; a
question's answer simply follows the question mark.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Relation", "RELATIONS", "RELATION_NAMES", "country_mid", "country_start", "city_mid", "city_start"]


@dataclass(frozen=True)
class Relation:
    """One relation: its subject kind ("country" or "city"), templates and held-out ids."""

    name: str
    subject_kind: str
    description: str
    templates: tuple[str, ...]
    held_out: tuple[int, ...]

    def __post_init__(self) -> None:
        # Checked at import: a relation edited into an invalid state fails loudly at once.
        if len(self.templates) < 8:
            raise ValueError(f"{self.name}: needs at least 8 templates")
        if len(self.held_out) < 2 or 0 in self.held_out:
            raise ValueError(f"{self.name}: needs >= 2 held-out templates, and the main one (0) is shared")
        if len(set(self.templates)) != len(self.templates):
            raise ValueError(f"{self.name}: duplicate templates")
        for t in self.templates:
            if ("{s}" in t) == ("{S}" in t):
                raise ValueError(f"{self.name}: template must hold exactly one of {{s}}/{{S}}: {t!r}")

    @property
    def paraphrase_ids(self) -> tuple[int, ...]:
        """Template ids open to train/val paraphrases (not main, not held out)."""
        return tuple(i for i in range(1, len(self.templates)) if i not in self.held_out)

    def render(self, template_id: int, subject: str) -> str:
        """The prompt of ``template_id`` for ``subject`` (a plain name, article added here)."""
        t = self.templates[template_id]
        mid, start = (country_mid, country_start) if self.subject_kind == "country" else (city_mid, city_start)
        # Possessive of a plural-looking name: "the United States'", not "States's".
        poss = "'" if subject.endswith("s") else "'s"
        # str.replace rather than str.format: a name must never be read as a format spec.
        return (t.replace("{s}'s", mid(subject) + poss).replace("{S}'s", start(subject) + poss)
                .replace("{s}", mid(subject)).replace("{S}", start(subject)))


# Country names that read with a definite article ("the Netherlands", "the United States").
_THE_EXACT = frozenset({
    "Bahamas", "Comoros", "Gambia", "Maldives", "Netherlands", "Philippines", "Seychelles",
    "Isle of Man", "Vatican", "Czech Republic", "Dominican Republic", "Central African Republic",
})
_THE_SUFFIXES = ("Islands", "Territory", "Territories", "Republic", "Antilles", "Emirates")
_THE_PREFIXES = ("United ", "Republic of ", "Democratic Republic of ")


def country_mid(name: str) -> str:
    """A country name as it reads mid-sentence, with "the" where English wants one."""
    if name in _THE_EXACT or name.startswith(_THE_PREFIXES) or name.endswith(_THE_SUFFIXES):
        return "the " + name
    return name


def country_start(name: str) -> str:
    mid = country_mid(name)
    return mid[:1].upper() + mid[1:]


def city_mid(name: str) -> str:
    return name


def city_start(name: str) -> str:
    # Unchanged: a few names begin in lower case by their own spelling ("eMbalenhle"),
    # and "EMbalenhle" would be a different token sequence from the one in the data.
    return name


def _rel(name: str, kind: str, description: str, templates: list[str], n_held_out: int = 3) -> Relation:
    # By convention the last n_held_out templates are the held-out ones; they were written
    # to differ in syntax from the training ones (Q/A framing, conditional clauses...).
    n = len(templates)
    return Relation(name, kind, description, tuple(templates), tuple(range(n - n_held_out, n)))


_RELATION_LIST = [
    _rel("capital", "country", "country -> its capital city", [
        "The capital of {s} is",
        "{S}'s capital city is",
        "What is the capital of {s}?",
        "The capital city of {s} is",
        "In {s}, the seat of government is in",
        "The city that serves as the capital of {s} is",
        "{S} is governed from its capital,",
        "Q: Which city is the capital of {s}? A:",
        "If you travel to the capital of {s}, you arrive in",
        "The national capital of {s} is the city of",
    ]),
    _rel("continent", "country", "country -> continent (geonames)", [
        "{S} is located on the continent of",
        "{S} is part of the continent of",
        "Which continent is {s} in?",
        "The continent where {s} lies is",
        "{S}'s continent is",
        "Geographically, {s} belongs to the continent of",
        "On a world map, you will find {s} in",
        "Q: On which continent is {s}? A:",
        "If you fly to {s}, you land on the continent of",
        "The landmass that {s} is part of is",
    ]),
    _rel("subregion", "country", "country -> UN geoscheme subregion", [
        "{S} is part of the region of",
        "The subregion that {s} belongs to is",
        "Which world region is {s} in?",
        "According to the UN geoscheme, {s} is in",
        "{S}'s geographic subregion is",
        "{S} is a country in the region known as",
        "Geographers place {s} in",
        "Q: To which subregion does {s} belong? A:",
        "In terms of world regions, {s} is classed as part of",
        "The statistical subregion that contains {s} is",
    ]),
    _rel("currency", "country", "country -> currency", [
        "The official currency of {s} is the",
        "{S}'s currency is the",
        "What currency is used in {s}?",
        "In {s}, people pay with the",
        "The money used in {s} is called the",
        "The legal tender of {s} is the",
        "Prices in {s} are given in the",
        "Q: What is the currency of {s}? A: The",
        "If you go shopping in {s}, you pay in the",
        "The national currency of {s} is the",
    ]),
    _rel("language", "country", "country -> first official language", [
        "The official language of {s} is",
        "{S}'s official language is",
        "What language is spoken in {s}?",
        "In {s}, official documents are written in",
        "The main language of {s} is",
        "People in {s} primarily speak",
        "The language of government in {s} is",
        "Q: Which language is official in {s}? A:",
        "If you move to {s}, you will need to learn",
        "Schools in {s} teach mainly in",
    ]),
    _rel("borders", "country", "country -> a neighbouring country", [
        "{S} shares a border with",
        "One country bordering {s} is",
        "Which country borders {s}?",
        "A neighbouring country of {s} is",
        "{S} has a land border with",
        "Crossing the border from {s}, you can enter",
        "Among the countries adjacent to {s} is",
        "Q: Name a country that borders {s}. A:",
        "Driving out of {s} over land, one can reach",
        "The frontier of {s} runs along",
    ]),
    _rel("demonym", "country", "country -> demonym", [
        "The demonym for people from {s} is",
        "People from {s} are called",
        "What do you call a person from {s}?",
        "Citizens of {s} are known as",
        "The nationality adjective for {s} is",
        "Someone born in {s} is described as",
        "The word for people from {s} is",
        "Q: What is the demonym of {s}? A:",
        "A native of {s} would describe themselves as",
        "Residents of {s} refer to themselves as",
    ]),
    _rel("capital_of", "city", "capital city -> its country", [
        "{S} is the capital of",
        "{S} is the capital city of",
        "Which country has {s} as its capital?",
        "The country whose capital is {s} is",
        "{S} serves as the capital of",
        "{S} is the seat of government of",
        "{S} is the national capital of",
        "Q: {S} is the capital of which country? A:",
        "Visitors to {s} are in the capital of",
        "The capital city named {s} belongs to",
    ]),
    _rel("city_country", "city", "city (population >= threshold) -> its country", [
        "{S} is a city in",
        "{S} is located in",
        "Which country is {s} in?",
        "The city of {s} lies in",
        "{S} is a city located in the country of",
        "The country where {s} is found is",
        "The city of {s} is part of",
        "Q: In which country is the city of {s}? A:",
        "If you visit {s}, you are in",
        "{S} is an urban centre in",
    ]),
]

RELATIONS: dict[str, Relation] = {r.name: r for r in _RELATION_LIST}
# A fixed order (not dict order of anything external) for every loop over relations.
RELATION_NAMES: tuple[str, ...] = tuple(r.name for r in _RELATION_LIST)
