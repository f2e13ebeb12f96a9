"""QA prompt sets and the documents that answer them (the Search-R1 task).

Two sources, both `type: prompt`, each question's gold answers a list of strings:

* `qa:countries`: questions about ~240 countries built offline from the `countryinfo`
  package (its JSON data files, MIT; not written on this project). Every country also
  becomes one short Markdown document; `brainforge qa countries OUT_DIR` writes them for
  `brainforge ingest`, so the memory store holds the facts and a policy learns to search
  for them. The split is by COUNTRY: `options.eval_size` countries (seeded by
  `options.seed`) are held out, and none of their questions is ever a training question,
  so a held-out answer cannot be memorised from training. Questions whose gold answer is
  written in the question itself ("the capital of Singapore") are dropped: they do not
  need a search.
* `qa:jsonl`: NQ / HotpotQA-style JSONL files (Search-R1's processed NQ uses
  `golden_answers`): `path:` is the training file, `options.test_path` the held-out one.

Each PromptExample's user message is the bare question (the algorithm adds its own
instruction); columns are `question`, `answer` (list of golds), `kind` and `country`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from brainforge.errors import DataError, MissingDependencyError

COUNTRIES_SOURCE = "qa:countries"
JSONL_SOURCE = "qa:jsonl"
TEST_SPLITS = ("test", "eval", "validation")

QUESTION_TEMPLATES: dict[str, str] = {
    "capital": "What is the capital of {name}?",
    "calling_code": "What is the international calling code of {name}?",
    "tld": "What is the top-level internet domain of {name}?",
    "currency": "What is the ISO currency code of {name}?",
    "subregion": "In which subregion of the world is {name}?",
    "demonym": "What is the demonym for people from {name}?",
}
KINDS = tuple(QUESTION_TEMPLATES)

DEFAULT_EVAL_SIZE = 40
MAX_BORDERS_NAMED = 6
MAX_PROVINCES_NAMED = 3
MAX_DOCUMENT_WORDS = 110
GOLD_KEYS = ("golden_answers", "answers", "answer")
QUESTION_KEYS = ("question", "query")


@dataclass(frozen=True)
class Country:
    """The facts of one country that a document states and a question asks about."""

    name: str
    region: str = ""
    subregion: str = ""
    capitals: tuple[str, ...] = ()
    calling_codes: tuple[str, ...] = ()
    currencies: tuple[str, ...] = ()
    tlds: tuple[str, ...] = ()
    demonyms: tuple[str, ...] = ()
    population: int | None = None
    area: float | None = None
    languages: tuple[str, ...] = ()
    borders: tuple[str, ...] = ()
    provinces: tuple[str, ...] = ()


@dataclass(frozen=True)
class QAItem:
    """One question with every answer that counts as correct."""

    question: str
    answers: tuple[str, ...]
    kind: str
    country: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"question": self.question, "answer": list(self.answers), "kind": self.kind, "country": self.country}


@dataclass(frozen=True)
class CountryQA:
    """The countries task for one seed: training and held-out questions, and who is held out."""

    train: list[QAItem]
    test: list[QAItem]
    held_out: tuple[str, ...]


# --------------------------------------------------------------------------- countries


def load_countries() -> list[Country]:
    """Every country in the `countryinfo` data files, by name, without duplicates.

    The package's data files are read directly (they are its whole content), so a
    missing or empty field simply becomes an empty fact and no question asks about it.
    Read once per process: training and evaluation each load both splits.
    """
    return list(_read_countries())


@functools.cache
def _read_countries() -> tuple[Country, ...]:
    spec = importlib.util.find_spec("countryinfo")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("countryinfo", "reasoning", f"The {COUNTRIES_SOURCE} QA task")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    raws: dict[str, dict[str, Any]] = {}
    for path in sorted(data_dir.glob("*.json")):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: unreadable countryinfo data file ({exc}); reinstall the package: "
                            "pip install --force-reinstall countryinfo") from exc
        name = _text(raw.get("name")) if isinstance(raw, dict) else ""
        if name:
            # The package ships Curaçao twice under two file names; the first one wins.
            raws.setdefault(unicodedata.normalize("NFC", name).casefold(), raw)
    by_alpha3 = {_text((raw.get("ISO") or {}).get("alpha3")).upper(): _text(raw["name"])
                 for raw in raws.values() if isinstance(raw.get("ISO"), dict)}
    by_alpha3.pop("", None)
    countries = [_country(raw, by_alpha3) for raw in raws.values()]
    return tuple(sorted(countries, key=lambda country: country.name.casefold()))


def _country(raw: dict[str, Any], by_alpha3: dict[str, str]) -> Country:
    area = raw.get("area")
    population = raw.get("population")
    return Country(
        name=_text(raw["name"]),
        region=_text(raw.get("region")),
        subregion=_text(raw.get("subregion")),
        capitals=_texts(raw.get("capital")),
        calling_codes=tuple(code for code in _texts(raw.get("callingCodes")) if re.fullmatch(r"\d+(-\d+)?", code)),
        currencies=tuple(code for code in _texts(raw.get("currencies")) if re.fullmatch(r"[A-Z]{3}", code)),
        # Some entries list a native-script domain written backwards ("الجزائر."); keep real ones.
        tlds=tuple(tld for tld in _texts(raw.get("tld")) if tld.startswith(".") and len(tld) > 1),
        # "Antiguan,Barbudan": one demonym per part of the country.
        demonyms=_texts(_text(raw.get("demonym")).split(",")),
        population=population if isinstance(population, int) and not isinstance(population, bool) and population > 0 else None,
        area=area if isinstance(area, (int, float)) and not isinstance(area, bool) and area > 0 else None,
        languages=_texts(raw.get("languages")),
        borders=tuple(by_alpha3.get(code.upper(), code) for code in _texts(raw.get("borders"))),
        provinces=_texts(raw.get("provinces")),
    )


def _text(value: Any) -> str:
    return " ".join(value.split()) if isinstance(value, str) else ""


def _texts(value: Any) -> tuple[str, ...]:
    """A string or a list of strings as a tuple of the non-empty ones, without repeats."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    out: list[str] = []
    for item in items:
        text = _text(item)
        if text and text not in out:
            out.append(text)
    return tuple(out)


def country_documents(countries: Iterable[Country]) -> dict[str, str]:
    """One short Markdown file per country (`bhutan.md` -> text), for `brainforge ingest`.

    Each sentence names the country, so a search for "capital of Bhutan" finds the
    document by its words as well as by meaning. At most `MAX_DOCUMENT_WORDS` words: three
    of them go into a small model's context per search, so the neighbours and provinces
    (asked by no question) are cut first. A country with no facts gets no file.
    """
    documents: dict[str, str] = {}
    for country in countries:
        text = _document(country)
        if not text:
            continue
        stem = slug(country.name)
        filename, n = f"{stem}.md", 2
        while filename in documents:
            filename, n = f"{stem}-{n}.md", n + 1
        documents[filename] = text
    return documents


def _document(country: Country) -> str:
    facts = _facts(country)
    if not facts:
        return ""
    heading = f"# {country.name}\n\n"
    for borders, provinces in _extras_shrinking():
        text = " ".join(facts + _extras(country, borders, provinces))
        if len(text.split()) <= MAX_DOCUMENT_WORDS:
            break
    return heading + text + "\n"


def _extras_shrinking() -> Iterator[tuple[int, int]]:
    """(neighbours named, provinces named), from the most to none: provinces go first."""
    for provinces in range(MAX_PROVINCES_NAMED, -1, -1):
        yield MAX_BORDERS_NAMED, provinces
    for borders in range(MAX_BORDERS_NAMED - 1, -1, -1):
        yield borders, 0


def _facts(country: Country) -> list[str]:
    """The sentences every question's answer is in; never cut."""
    name = country.name
    out: list[str] = []
    if country.subregion and country.region and country.region != country.subregion:
        out.append(f"{name} is in {country.subregion}, a subregion of {country.region}.")
    elif country.subregion or country.region:
        out.append(f"{name} is in {country.subregion or country.region}.")
    if country.capitals:
        out.append(_sentence(f"The capital of {name} is {_and(country.capitals)}"))
    if country.calling_codes:
        codes = _and([f"+{code}" for code in country.calling_codes])
        out.append(f"The international calling code{_s(country.calling_codes)} of {name} {_is(country.calling_codes)} {codes}.")
    if country.currencies:
        out.append(f"The currency code{_s(country.currencies)} of {name} {_is(country.currencies)} {_and(country.currencies)}.")
    if country.tlds:
        out.append(f"The top-level internet domain{_s(country.tlds)} of {name} {_is(country.tlds)} {_and(country.tlds)}.")
    if country.demonyms:
        out.append(_sentence(f"People from {name} are called {_and(country.demonyms, 'or')}"))
    sizes = []
    if country.population:
        sizes.append(f"a population of {country.population:,}")
    if country.area:
        sizes.append(f"an area of {country.area:,.0f} square kilometres")
    if sizes:
        out.append(f"{name} has {' and '.join(sizes)}.")
    if country.languages:
        out.append(f"Languages of {name} (ISO 639-1 codes): {', '.join(country.languages)}.")
    return out


def _extras(country: Country, borders: int, provinces: int) -> list[str]:
    """Neighbours and provinces: context only, no question asks about them."""
    out = []
    if country.borders and borders:
        named = list(country.borders[:borders])
        if len(country.borders) > len(named):
            named.append(f"{len(country.borders) - len(named)} other countries")
        out.append(_sentence(f"{country.name} borders {_and(named)}"))
    if country.provinces and provinces:
        more = " among others" if len(country.provinces) > provinces else ""
        out.append(_sentence(f"Provinces of {country.name} include {_and(country.provinces[:provinces])}{more}"))
    return out


def _sentence(text: str) -> str:
    """Close with a full stop unless the last word already has one (`Washington D.C.`)."""
    return text if text.endswith(".") else f"{text}."


def _and(items: Iterable[str], word: str = "and") -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


def _s(items: tuple[str, ...]) -> str:
    return "s" if len(items) > 1 else ""


def _is(items: tuple[str, ...]) -> str:
    return "are" if len(items) > 1 else "is"


def slug(name: str) -> str:
    """`Côte d'Ivoire` -> `cote_d_ivoire`: ASCII, lower case, safe as a file name."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_") or "country"


def country_questions(country: Country, kinds: Iterable[str] = KINDS) -> list[QAItem]:
    """The questions the country's facts answer, one per kind, each with its golds.

    A kind whose fact is missing is skipped, and so is a question whose gold is written in
    the question itself (the capital of Singapore is Singapore): it needs no search.
    """
    golds: dict[str, list[str]] = {
        "capital": list(country.capitals),
        "calling_code": [g for code in country.calling_codes for g in (code, f"+{code}")],
        "tld": list(country.tlds),
        "currency": list(country.currencies),
        "subregion": [country.subregion] if country.subregion else [],
        "demonym": list(country.demonyms),
    }
    out = []
    for kind in kinds:
        answers = golds[kind]
        question = QUESTION_TEMPLATES[kind].format(name=country.name)
        if answers and not any(_contains_words(question, answer) for answer in answers):
            out.append(QAItem(question, tuple(answers), kind, country.name))
    return out


def _contains_words(text: str, phrase: str) -> bool:
    words = _words(phrase)
    return bool(words) and f" {words} " in f" {_words(text)} "


def _words(text: str) -> str:
    """Lower-case words; a leading `.` or `+` stays on its word, so the domain `.is` is
    not the verb in "What is ...", while `Saint-Pierre` matches "Saint Pierre"."""
    return " ".join(re.findall(r"[.+]?\w+", text.casefold()))


def split_countries(countries: list[Country], eval_size: int, seed: int) -> tuple[list[Country], list[Country]]:
    """(training countries, held-out countries): a seeded sample of `eval_size` is held out.

    Only countries with at least one question of ANY kind take part, so the held-out set
    depends on the seed and size alone, not on which kinds a config asks for.
    """
    eligible = [country for country in countries if country_questions(country)]
    if not 0 <= eval_size < len(eligible):
        raise DataError(f"{COUNTRIES_SOURCE}: options.eval_size (--eval-size) is the number of held-out countries and must be "
                        f"between 0 and {len(eligible) - 1}, got {eval_size}")
    held = set(random.Random(seed).sample(range(len(eligible)), eval_size))
    train = [country for i, country in enumerate(eligible) if i not in held]
    test = [country for i, country in enumerate(eligible) if i in held]
    return train, test


def country_qa(seed: int = 0, eval_size: int = DEFAULT_EVAL_SIZE, kinds: Iterable[str] = KINDS,
               size: int | None = None, countries: list[Country] | None = None) -> CountryQA:
    """Training and held-out questions, split by country; each list in a seeded order."""
    kinds = tuple(kinds)
    countries = load_countries() if countries is None else countries
    train_countries, test_countries = split_countries(countries, eval_size, seed)
    train = [item for country in train_countries for item in country_questions(country, kinds)]
    test = [item for country in test_countries for item in country_questions(country, kinds)]
    # String seeds hash the same in every process (unlike hash()), so the order is reproducible.
    random.Random(f"{seed}:train").shuffle(train)
    random.Random(f"{seed}:test").shuffle(test)
    if size is not None:
        train = train[:size]
    return CountryQA(train, test, tuple(country.name for country in test_countries))


def countries_prompts(options: dict[str, Any], split: str) -> list[Any]:
    """The `qa:countries` prompt source: held-out questions for `split: test`, else training ones."""
    from brainforge.data.prompts import _int_option

    _check_options(COUNTRIES_SOURCE, options, {"seed", "eval_size", "kinds", "size"})
    seed = _int_option(options, "seed", 0, COUNTRIES_SOURCE)
    eval_size = _int_option(options, "eval_size", DEFAULT_EVAL_SIZE, COUNTRIES_SOURCE)
    size = _int_option(options, "size", 0, COUNTRIES_SOURCE) if "size" in options else None
    if size is not None and size < 1:
        raise DataError(f"{COUNTRIES_SOURCE}: options.size caps the training questions and must be at least 1, got {size}")
    task = country_qa(seed, eval_size, parse_kinds(options.get("kinds")), size)
    return to_prompts(task.test if split in TEST_SPLITS else task.train)


def parse_kinds(value: Any) -> tuple[str, ...]:
    """`options.kinds`: a list or comma-separated string of question kinds (default: all)."""
    if value is None:
        return KINDS
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None or not all(isinstance(item, str) for item in items):
        raise DataError(f"{COUNTRIES_SOURCE}: options.kinds must be a list of question kinds ({', '.join(KINDS)}), got {value!r}")
    kinds = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    unknown = [kind for kind in kinds if kind not in QUESTION_TEMPLATES]
    if unknown or not kinds:
        raise DataError(f"{COUNTRIES_SOURCE}: options.kinds has unknown kind(s) {unknown or value!r}; "
                        f"choose from {', '.join(KINDS)}")
    return kinds


def _check_options(source: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(f"{source}: unknown option(s) {', '.join(unknown)}; this source takes {', '.join(sorted(allowed))}")


def to_prompts(items: Iterable[QAItem]) -> list[Any]:
    from brainforge.data.prompts import PromptExample

    return [PromptExample([{"role": "user", "content": item.question}],
                          {"question": item.question, "answer": list(item.answers), "kind": item.kind, "country": item.country})
            for item in items]


# --------------------------------------------------------------------------- JSONL


def jsonl_prompts(path: str | None, options: dict[str, Any], split: str) -> list[Any]:
    """The `qa:jsonl` source: `path` for training, `options.test_path` for `split: test`."""
    _check_options(JSONL_SOURCE, options, {"test_path"})
    if split in TEST_SPLITS:
        test_path = options.get("test_path")
        if not isinstance(test_path, str) or not test_path.strip():
            raise DataError(f"{JSONL_SOURCE}: split '{split}' reads options.test_path, which is not set; "
                            "add options: {test_path: your_test.jsonl} to the source")
        return to_prompts(read_qa_jsonl(test_path))
    if not path:
        raise DataError(f"{JSONL_SOURCE}: give the training file as path: your_train.jsonl")
    return to_prompts(read_qa_jsonl(path))


def read_qa_jsonl(path: str | Path) -> list[QAItem]:
    """Every question of an NQ / HotpotQA-style JSONL file; a bad line names file and line."""
    return list(iter_qa_jsonl(path))


def iter_qa_jsonl(path: str | Path) -> Iterator[QAItem]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: QA file not found (a JSONL file with a question and golden_answers per line)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        number = 0
        while True:
            where = f"{path}:{number + 1}"
            try:
                line = handle.readline()
            except (UnicodeDecodeError, OSError, EOFError) as exc:
                raise DataError(f"{where}: cannot read the line ({exc}); the file must be UTF-8 JSONL") from None
            if not line:
                return
            number += 1
            if line.strip():
                yield _qa_line(line, where)


def _qa_line(line: str, where: str) -> QAItem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: a line must be a JSON object with a question and golden_answers, got {type(row).__name__}")
    question = next((row[key] for key in QUESTION_KEYS if key in row), None)
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: no question; put the question text under 'question' (or 'query')")
    gold_key = next((key for key in GOLD_KEYS if key in row), None)
    answers = _golds(row[gold_key]) if gold_key else None
    if not answers:
        named = f"'{gold_key}' is {row[gold_key]!r}" if gold_key else "no 'golden_answers', 'answers' or 'answer' field"
        raise DataError(f"{where}: missing gold answers ({named}); give a non-empty string or list of strings under 'golden_answers'")
    kind = row.get("kind") if isinstance(row.get("kind"), str) else row.get("type") if isinstance(row.get("type"), str) else "qa"
    country = row.get("country") if isinstance(row.get("country"), str) else ""
    return QAItem(question.strip(), answers, kind, country)


def _golds(value: Any) -> tuple[str, ...] | None:
    """Gold answers as non-empty strings; None when the value is not a string / list of strings.

    SQuAD-style `{"text": [...]}` is read too; numbers become their text (`1969`).
    """
    if isinstance(value, dict):
        value = value.get("text")
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            return None
        if item.strip() and item.strip() not in out:
            out.append(item.strip())
    return tuple(out) or None
