"""Other ways to write what a gate reads: the names that open an edit's gate besides its own.

A routed edit's gate opens on the words of the names its prompt holds (editors/route.py).
Users rephrase those names: "Who is India's PM?" becomes "Who is the Indian prime minister?",
"the UK" becomes "Britain", "Apple Inc." becomes "Apple". Without another way in, such a
paraphrase never opens the gate and never gets the edit, however well the edit generalises.
This module owns those other ways:

- a country's other names, from `countryinfo` (MIT licence; already a dependency, the source of
  the bundled data's geography): its demonym, which English also uses as its adjective
  ("Indian", "British", "Dutch"; and its people, "Indians", where the plural adds an s), its
  alternative spellings in Latin script that are names, not ISO codes ("UK", "Great Britain",
  "Holland", "Republic of India"; not "IN", nor "République française", whose lowercase word
  a gate would drop), and the few short forms English uses that the source lacks or lists
  only as codes (`SHORT_FORMS`). A demonym that several countries share goes to the most
  populous where it has ten times the next one's people ("French": France, not Réunion), and
  to none where it does not;
- a company name's legal form ("Inc", "Corp", "Ltd", "plc", …), which a question may leave out.

`alternatives(words)` turns a gate's words into the other word sets that name the same thing,
one name rewritten at a time; `titled` adds, for a one-word alias, the alias with the edit's own
relation written as a title ("French" + "President"): a one-word alias before a capitalised
word reads as the start of another name ("the French Revolution", editors/route.py), except
before the very office or attribute the edit is about ("the French President"). What an entry gets is recorded with it (routing.py), so a new
release of the source never changes an old entry's gate.
"""
from __future__ import annotations

import re
from functools import lru_cache

_WORD = re.compile(r"\w+")

#: words that are part of how a name is put, never a name of their own
_PARTICLES = frozenset("the of and a an de la le du des del d l al el da di do dos das van von der den "
                       "y e et und".split())

#: a company's legal form: a question about it may leave it out ("Apple" for "Apple Inc.")
LEGAL_FORMS = frozenset("Inc Incorporated Corp Corporation Ltd Limited plc PLC LLC AG SE NV SA "
                        "SpA GmbH Co".split())

#: short forms in common English use that countryinfo lists only as ISO codes, or not at all
SHORT_FORMS = {"United States": ("US", "USA", "America"), "United Kingdom": ("Britain",)}

#: most alternatives a gate keeps (a name with many spellings; each is one more word set the
#: gate's index looks up, never a search per text)
MAX_ALTERNATIVES = 12


def name_words(name: str) -> tuple[str, ...]:
    """The words of `name` a gate would read: those with a capital letter or a digit, less the
    particles ("of", "the"): "Republic of India" → ("Republic", "India")."""
    return tuple(dict.fromkeys(w for w in _WORD.findall(name)
                               if any(ch.isupper() or ch.isdigit() for ch in w)
                               and w.lower() not in _PARTICLES))


def _latin(text: str) -> bool:
    return all(ch.isascii() or "\u00c0" <= ch <= "\u024f" for ch in text)


def _whole(name: str) -> bool:
    """Does every word of `name` count as a name's word (`name_words` drops none but the
    particles)?"""
    return all(w.lower() in _PARTICLES or w in name_words(name) for w in _WORD.findall(name))


@lru_cache(maxsize=1)
def country_groups() -> tuple[tuple[tuple[str, ...], ...], ...]:
    """Per country, the word sets of its names (its name first), from `countryinfo`."""
    import countryinfo  # (imported here: only making a new gate needs it)

    rows = []
    for c in countryinfo.all_countries():
        try:
            name, dem, alts, iso = c.name(), c.demonym(), c.alt_spellings() or [], c.iso() or {}
            people = int(c.population() or 0)
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # an entry without the fields (a few territories)
        if name:
            rows.append((name, dem or "", alts, {iso.get("alpha2"), iso.get("alpha3")}, people))
    by_demonym: dict[str, list[int]] = {}
    for name, dem, _, _, people in rows:
        if dem:
            by_demonym.setdefault(dem, []).append(people)
    groups = []
    for name, dem, alts, codes, people in rows:
        names = [name]
        if dem:
            shared = sorted(by_demonym[dem], reverse=True)
            if people == shared[0] and (len(shared) == 1 or people >= 10 * shared[1]):
                names.append(dem)
                if dem.endswith("n"):  # its people: "What currency do Indians use?"
                    names.append(dem + "s")
        names += [a for a in alts if a and a not in codes and "," not in a and _latin(a)
                  and _whole(a)]
        names += SHORT_FORMS.get(name, ())
        sets = list(dict.fromkeys(ws for ws in map(name_words, names) if ws))
        if len(sets) > 1:
            groups.append(tuple(sets))
    return tuple(groups)


def _minimal(sets: list[tuple[str, ...]], words: tuple[str, ...]) -> list[tuple[str, ...]]:
    """`sets` less any that holds all of `words` or of an earlier-kept set (a text that opens
    it opens the gate already)."""
    kept: list[tuple[str, ...]] = []
    for ws in sorted(dict.fromkeys(sets), key=len):
        if set(words) <= set(ws) or any(set(k) <= set(ws) for k in kept):
            continue
        kept.append(ws)
    return kept


def alternatives(words: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Other word sets that name what `words` name (a gate's words: all must appear), one name
    rewritten at a time: ("India",) → ("Indian",), ("Bharat", "Ganrajya"), …;
    ("Apple", "Inc") → ("Apple",). The longest of a country's names that `words` hold is the
    one rewritten ("Republic of India", not "India" inside it). Empty where there is none."""
    if not words:
        return ()
    have = set(words)
    out: list[tuple[str, ...]] = []
    for group in country_groups():
        held = [ws for ws in group if set(ws) <= have]
        if not held:
            continue
        named = max(held, key=len)
        rest = tuple(w for w in words if w not in named)
        out += [rest + ws for ws in group if ws != named]
    plain = tuple(w for w in words if w not in LEGAL_FORMS)
    if plain and plain != words:
        out.append(plain)
    return tuple(_minimal(out, words)[:MAX_ALTERNATIVES])


def titled(alts: tuple[tuple[str, ...], ...], relation: list[str]) -> tuple[tuple[str, ...], ...]:
    """For each one-word alias of `alts`, the alias with each of `relation` (the edit prompt's
    own lowercase words: "president") written with a capital after it: ("French",
    "President"). Both must appear, as the words of any alias set."""
    titles = [w[:1].upper() + w[1:] for w in relation]
    return tuple(a + (t,) for a in alts if len(a) == 1 for t in titles if t != a[0])
