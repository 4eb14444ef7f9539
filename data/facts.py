"""
data/facts.py -- documents of invented facts, and questions about them: a test no model can pass from memory.

    documents, questions = generate_facts(n_countries=20, seed=0)
    write_documents(documents, "data/facts_docs")    # one .md file per country, for --docs
    questions[0]   # {"question": "What is the capital of Zorbia?", "answer": "Quellin", "source": "zorbia.md"}

Every country, city and person is made up from syllables by a seeded random generator, so
the facts are in no model's training data: a model answers them only from the passages
retrieval puts in its prompt (retrieval.py). Each country gets one file of a few short
paragraphs (capital, founder, animal, export, river, population, and a neighbour it trades
with), which makes the countries compete for the same words ("capital", "river", even the
neighbour's name): BM25 must rank by how often the rare words, the names, occur.
"""

from __future__ import annotations

import random
from pathlib import Path

SYLLABLES = ("zor quel lin mar tav bri osk nel dru fen kal vos ther ily ran gol pim sed ux abe "
             "tor wen qua hul mir sab dex ona fal rud").split()
ANIMALS = ("otter", "heron", "lynx", "ibex", "falcon", "badger", "gecko", "walrus", "crane", "marten")
EXPORTS = ("copper", "saffron", "glass", "wool", "salt", "cedar wood", "silk", "tin", "honey", "amber")

FACT_TEMPLATES = [   # (sentence of the document, question, the key of the answer)
    ("The capital of {country} is {city}.", "What is the capital of {country}?", "city"),
    ("{country} was founded by {founder} in the year {year}.", "Who founded {country}?", "founder"),
    ("The national animal of {country} is the {animal}.", "What is the national animal of {country}?", "animal"),
    ("The main export of {country} is {export}.", "What is the main export of {country}?", "export"),
    ("The longest river in {country} is the {river}.", "What is the longest river in {country}?", "river"),
]


def made_up_name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def generate_facts(n_countries: int = 20, seed: int = 0) -> tuple[dict[str, str], list[dict]]:
    """-> ({file name: markdown text}, [{"question", "answer", "source"}]), the same for the same seed."""
    rng = random.Random(seed)
    used, documents, questions = set(), {}, []

    def fresh(syllables: int) -> str:
        while True:
            name = made_up_name(rng, syllables)
            if name not in used:
                used.add(name)
                return name
    countries = [{"country": fresh(2) + rng.choice(("ia", "land", "or", "istan")), "city": fresh(2),
                  "founder": f"{fresh(2)} {fresh(2)}", "year": rng.randint(800, 1900), "animal": rng.choice(ANIMALS),
                  "export": rng.choice(EXPORTS), "river": fresh(2)} for _ in range(n_countries)]
    for i, facts in enumerate(countries):
        country = facts["country"]
        source = f"{country.lower()}.md"
        paragraphs = [f"# {country}"] + [sentence.format(**facts) for sentence, _, _ in FACT_TEMPLATES]
        paragraphs.append(f"About {rng.randint(2, 90) * 100_000:,} people live in {country}.")
        if n_countries > 1:       # a neighbour named in the text: its questions' words appear here too
            paragraphs.append(f"{country} trades mostly with {countries[i - 1]['country']}, whose river is "
                              f"the {countries[i - 1]['river']}.")
        documents[source] = "\n\n".join(paragraphs) + "\n"
        questions += [{"question": question.format(**facts), "answer": str(facts[key]), "source": source}
                      for _, question, key in FACT_TEMPLATES]
    return documents, questions


def write_documents(documents: dict[str, str], folder: str | Path) -> Path:
    """Write the documents as files in folder (made if missing); a file there with other text is not
    overwritten: the folder must be new, or hold these same documents."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in documents.items():
        path = folder / name
        if path.exists() and path.read_text(encoding="utf-8") != text:
            raise ValueError(f"{path} exists with other text: choose an empty folder for the generated documents")
    for name, text in documents.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def answer_is_right(answer: str, expected: str) -> bool:
    """The expected name (or number) appears in the answer, ignoring case: a small model rarely
    answers with the bare name, and the made-up names cannot appear by chance."""
    return expected.lower() in answer.lower()
