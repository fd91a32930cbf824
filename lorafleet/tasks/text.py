"""String task families: edits (reverse, case, vowel removal), spelling, counting, word order, extraction."""

from __future__ import annotations

import random

from lorafleet.tasks.lexicon import CITIES, FIRST_NAMES, JOBS, PLURALS, VOWELS, WORDS
from lorafleet.tasks.registry import task


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _phrase(rng: random.Random, lo: int = 3, hi: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


@task("reverse_word", "Write the word backwards.", split="seen", kind="string edit")
def reverse_word(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[::-1]


@task("uppercase", "Rewrite the text in capital letters.", split="seen", kind="string edit")
def uppercase(rng: random.Random) -> tuple[str, str]:
    text = " ".join(_phrase(rng, 1, 3))
    return text, text.upper()


@task("lowercase", "Rewrite the text in lowercase letters.", split="heldout", kind="string edit")
def lowercase(rng: random.Random) -> tuple[str, str]:
    text = " ".join(_phrase(rng, 1, 3))
    return text.upper(), text


@task("remove_vowels", "Remove every vowel from the word.", split="seen", kind="string edit")
def remove_vowels(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, "".join(c for c in w if c not in VOWELS)


@task("spell_word", "Spell the word with a hyphen between letters.", split="seen", kind="spelling")
def spell_word(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, "-".join(w)


@task("first_letter", "What is the first letter of the word?", split="seen", kind="spelling")
def first_letter(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[0]


@task("last_letter", "What is the last letter of the word?", split="heldout", kind="spelling")
def last_letter(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, w[-1]


@task("count_letters", "How many letters does the word have? Answer with the number only.", split="seen",
      kind="counting")
def count_letters(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, str(len(w))


@task("count_words", "How many words are in the text? Answer with the number only.", split="heldout",
      kind="counting")
def count_words(rng: random.Random) -> tuple[str, str]:
    words = _phrase(rng, 2, 7)
    return " ".join(words), str(len(words))


@task("count_letter", "How many times does the letter appear in the word? Answer with the number only.",
      split="seen", kind="counting")
def count_letter(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    letter = rng.choice(w)
    return f"letter {letter} in {w}", str(w.count(letter))


@task("last_word", "What is the last word of the text?", split="seen", kind="word order")
def last_word(rng: random.Random) -> tuple[str, str]:
    words = _phrase(rng)
    return " ".join(words), words[-1]


@task("sort_words", "Sort the words alphabetically, separated by spaces.", split="seen", kind="sorting")
def sort_words(rng: random.Random) -> tuple[str, str]:
    words = _phrase(rng, 3, 4)
    return " ".join(words), " ".join(sorted(words))


@task("acronym", "Write the first letter of each word, in capitals, as one word.", split="heldout",
      kind="string edit")
def acronym(rng: random.Random) -> tuple[str, str]:
    words = _phrase(rng, 2, 4)
    return " ".join(words), "".join(w[0] for w in words).upper()


@task("plural", "Give the plural of the noun.", split="seen", kind="word form")
def plural(rng: random.Random) -> tuple[str, str]:
    singular, many = rng.choice(PLURALS)
    return singular, many


def _record(rng: random.Random) -> tuple[str, dict[str, str]]:
    fields = {"name": rng.choice(FIRST_NAMES), "age": str(rng.randint(18, 90)), "city": rng.choice(CITIES),
              "job": rng.choice(JOBS)}
    order = list(fields)
    rng.shuffle(order)
    return "; ".join(f"{k}: {fields[k]}" for k in order), fields


@task("extract_city", "Give the city from the record.", split="seen", kind="field extraction")
def extract_city(rng: random.Random) -> tuple[str, str]:
    text, fields = _record(rng)
    return text, fields["city"]


@task("extract_name", "Give the name from the record.", split="seen", kind="field extraction")
def extract_name(rng: random.Random) -> tuple[str, str]:
    text, fields = _record(rng)
    return text, fields["name"]


@task("extract_age", "Give the age from the record.", split="heldout", kind="field extraction")
def extract_age(rng: random.Random) -> tuple[str, str]:
    text, fields = _record(rng)
    return text, fields["age"]
