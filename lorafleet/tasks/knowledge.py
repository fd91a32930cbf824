"""Lexicon and knowledge task families: classification, colours, capitals, antonyms, analogies, dates."""

from __future__ import annotations

import datetime as dt
import random

from lorafleet.tasks.lexicon import (
    ANIMALS,
    ANTONYMS,
    CAPITALS,
    FRUITS,
    MONTHS,
    NEGATIVE,
    OBJECT_COLORS,
    PLANTS,
    POSITIVE,
    SENTIMENT_FRAMES,
    VEGETABLES,
    WEEKDAYS,
)
from lorafleet.tasks.registry import task


def _either(rng: random.Random, first: tuple[str, ...], second: tuple[str, ...], labels: tuple[str, str]
            ) -> tuple[str, str]:
    """A word from ``first`` or ``second`` (a fair coin) and its label."""
    if rng.random() < 0.5:
        return rng.choice(first), labels[0]
    return rng.choice(second), labels[1]


@task("sentiment", "Is the sentence positive or negative? Answer positive or negative.", split="seen",
      kind="lexicon classification")
def sentiment(rng: random.Random) -> tuple[str, str]:
    word, label = _either(rng, POSITIVE, NEGATIVE, ("positive", "negative"))
    return rng.choice(SENTIMENT_FRAMES).format(word), label


@task("animal_or_plant", "Is this an animal or a plant? Answer animal or plant.", split="seen",
      kind="lexicon classification")
def animal_or_plant(rng: random.Random) -> tuple[str, str]:
    return _either(rng, ANIMALS, PLANTS, ("animal", "plant"))


@task("fruit_or_vegetable", "Is this a fruit or a vegetable? Answer fruit or vegetable.", split="heldout",
      kind="lexicon classification")
def fruit_or_vegetable(rng: random.Random) -> tuple[str, str]:
    return _either(rng, FRUITS, VEGETABLES, ("fruit", "vegetable"))


@task("object_color", "What colour is this usually? Answer with one colour.", split="seen",
      kind="lexicon classification")
def object_color(rng: random.Random) -> tuple[str, str]:
    return rng.choice(OBJECT_COLORS)


@task("capital_of", "What is the capital of the country?", split="seen", kind="capitals")
def capital_of(rng: random.Random) -> tuple[str, str]:
    return rng.choice(CAPITALS)


@task("country_of_capital", "Which country has this capital city?", split="heldout", kind="capitals")
def country_of_capital(rng: random.Random) -> tuple[str, str]:
    country, capital = rng.choice(CAPITALS)
    return capital, country


@task("antonym", "Give the opposite of the word.", split="seen", kind="analogy")
def antonym(rng: random.Random) -> tuple[str, str]:
    pair = rng.choice(ANTONYMS)
    return (pair[0], pair[1]) if rng.random() < 0.5 else (pair[1], pair[0])


@task("analogy", "Complete the analogy with one word.", split="heldout", kind="analogy")
def analogy(rng: random.Random) -> tuple[str, str]:
    (a, b), (c, d) = rng.sample(ANTONYMS, 2)
    return f"{a} is to {b} as {c} is to ?", d


@task("next_weekday", "Which day of the week comes after this one?", split="seen", kind="date reasoning")
def next_weekday(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(7)
    return WEEKDAYS[i], WEEKDAYS[(i + 1) % 7]


@task("previous_weekday", "Which day of the week comes before this one?", split="heldout", kind="date reasoning")
def previous_weekday(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(7)
    return WEEKDAYS[i], WEEKDAYS[(i - 1) % 7]


@task("next_month", "Which month comes after this one?", split="seen", kind="date reasoning")
def next_month(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(12)
    return MONTHS[i], MONTHS[(i + 1) % 12]


@task("add_days", "Add the days to the date. Answer as YYYY-MM-DD.", split="seen", kind="date reasoning")
def add_days(rng: random.Random) -> tuple[str, str]:
    start = dt.date(2000, 1, 1) + dt.timedelta(days=rng.randrange(11000))
    days = rng.randint(1, 10)
    return f"{start.isoformat()} plus {days} days", (start + dt.timedelta(days=days)).isoformat()


@task("leap_year", "Is this a leap year? Answer yes or no.", split="heldout", kind="date reasoning")
def leap_year(rng: random.Random) -> tuple[str, str]:
    year = rng.randint(1890, 2100)
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    return str(year), "yes" if leap else "no"
