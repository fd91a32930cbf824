"""The built-in task suite: registry, determinism, splits, and every checkable family against an oracle."""

from __future__ import annotations

import calendar
import datetime as dt
import operator
import re

import pytest

from lorafleet import tasks
from lorafleet.export.formats.errors import ConfigError
from lorafleet.tasks import lexicon

ORACLES = {
    "add": lambda i: str(_binop(i, "+")), "subtract": lambda i: str(_binop(i, "-")),
    "multiply": lambda i: str(_binop(i, "*")),
    "remainder": lambda i: str(operator.mod(*map(int, i.split(" divided by ")))),
    "double": lambda i: str(int(i) * 2),
    "km_to_m": lambda i: str(int(i.removesuffix(" km")) * 1000),
    "kg_to_g": lambda i: str(int(i.removesuffix(" kg")) * 1000),
    "hours_to_minutes": lambda i: str(int(i.removesuffix(" hours")) * 60),
    "celsius_to_fahrenheit": lambda i: f"{int(i.removesuffix(' C')) * 1.8 + 32:g}",
    "larger_of_two": lambda i: str(max(_ints(i))),
    "is_greater": lambda i: "yes" if _ints(i)[0] > _ints(i)[1] else "no",
    "list_max": lambda i: str(max(_ints(i))), "list_min": lambda i: str(min(_ints(i))),
    "sort_ascending": lambda i: ", ".join(map(str, sorted(_ints(i)))),
    "sort_descending": lambda i: ", ".join(map(str, sorted(_ints(i))[::-1])),
    "parity": lambda i: ("odd", "even")[int(i) % 2 == 0],
    "next_number": lambda i: str(int(i) + 1), "previous_number": lambda i: str(int(i) - 1),
    "reverse_word": lambda i: "".join(reversed(i)), "uppercase": str.upper, "lowercase": str.lower,
    "remove_vowels": lambda i: re.sub("[aeiou]", "", i), "spell_word": lambda i: "-".join(list(i)),
    "first_letter": lambda i: i[:1], "last_letter": lambda i: i[-1:],
    "count_letters": lambda i: str(len(i)), "count_words": lambda i: str(len(i.split())),
    "count_letter": lambda i: str(i.split(" in ")[1].count(i.split()[1])),
    "last_word": lambda i: i.split()[-1], "sort_words": lambda i: " ".join(sorted(i.split())),
    "acronym": lambda i: "".join(w[0].upper() for w in i.split()),
    "extract_city": lambda i: _record(i)["city"], "extract_name": lambda i: _record(i)["name"],
    "extract_age": lambda i: _record(i)["age"],
    "next_weekday": lambda i: _cycle(calendar.day_name, i, 1),
    "previous_weekday": lambda i: _cycle(calendar.day_name, i, -1),
    "next_month": lambda i: _cycle(calendar.month_name[1:], i, 1),
    "add_days": lambda i: str(dt.date.fromisoformat(i.split()[0]) + dt.timedelta(days=int(i.split()[2]))),
    "leap_year": lambda i: "yes" if calendar.isleap(int(i)) else "no",
    "capital_of": lambda i: dict(lexicon.CAPITALS)[i],
    "country_of_capital": lambda i: {b: a for a, b in lexicon.CAPITALS}[i],
    "object_color": lambda i: dict(lexicon.OBJECT_COLORS)[i],
    "plural": lambda i: dict(lexicon.PLURALS)[i],
    "antonym": lambda i: {**dict(lexicon.ANTONYMS), **{b: a for a, b in lexicon.ANTONYMS}}[i],
    "analogy": lambda i: {**dict(lexicon.ANTONYMS), **{b: a for a, b in lexicon.ANTONYMS}}[i.split()[-4]],
    "animal_or_plant": lambda i: "animal" if i in lexicon.ANIMALS else "plant",
    "fruit_or_vegetable": lambda i: "fruit" if i in lexicon.FRUITS else "vegetable",
    "sentiment": lambda i: "positive" if any(w in i.rstrip(".").split() for w in lexicon.POSITIVE) else "negative",
}


def _binop(text: str, op: str) -> int:
    a, b = text.split(f" {op} ")
    return {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](int(a), int(b))


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _record(text: str) -> dict[str, str]:
    return dict(field.split(": ") for field in text.split("; "))


def _cycle(names: list[str] | tuple[str, ...], name: str, step: int) -> str:
    names = list(names)
    return names[(names.index(name) + step) % len(names)]


def test_suite_has_at_least_30_families_in_two_disjoint_splits():
    seen, heldout = tasks.seen_families(), tasks.heldout_families()
    assert len(seen) + len(heldout) >= 30
    assert len(heldout) >= 8 and len(seen) >= 20
    assert not set(seen) & set(heldout)
    assert sorted(seen + heldout) == tasks.families()
    kinds = {tasks.family(n).kind for n in tasks.families()}
    assert {"arithmetic", "unit conversion", "string edit", "sorting", "date reasoning",
            "lexicon classification", "field extraction", "counting", "comparison", "capitals"} <= kinds


def test_every_family_has_an_oracle():
    assert set(ORACLES) == set(tasks.families())


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_family_outputs_match_an_independent_oracle(name):
    for ex in tasks.generate(name, 60, seed=3):
        assert ex.instruction == tasks.family(name).instruction
        assert ex.output == ORACLES[name](ex.input), (name, ex)
        assert 0 < len(ex.output) <= 40 and ex.input


def test_generation_is_deterministic_and_seeded():
    a = tasks.generate("reverse_word", 20, seed=7)
    assert a == tasks.generate("reverse_word", 20, seed=7)
    assert a != tasks.generate("reverse_word", 20, seed=8)
    assert a != tasks.generate("reverse_word", 20, seed=7, stream="eval")
    assert tasks.generate("reverse_word", 5, seed=7) == a[:5]


def test_eval_sets_cover_both_splits():
    sets = tasks.eval_sets(3, seed=0)
    assert set(sets) == {"seen", "heldout"}
    assert list(sets["heldout"]) == tasks.heldout_families()
    assert all(len(v) == 3 for v in sets["seen"].values())
    assert sets["seen"]["add"] == tasks.generate("add", 3, seed=0, stream="eval")


def test_registry_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown task family 'nope'"):
        tasks.generate("nope", 1, seed=0)
    with pytest.raises(ConfigError, match="n must be >= 0, got -1"):
        tasks.generate("add", -1, seed=0)
    with pytest.raises(ConfigError, match="stream must be one of .* got 'test'"):
        tasks.generate("add", 1, seed=0, stream="test")
    with pytest.raises(ConfigError, match="registered twice"):
        tasks.task("add", "x", split="seen", kind="arithmetic")(lambda rng: ("a", "b"))
    with pytest.raises(ConfigError, match="split must be one of .* got 'train'"):
        tasks.task("new", "x", split="train", kind="k")  # type: ignore[arg-type]
