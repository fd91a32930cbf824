"""Numeric task families: arithmetic, unit conversion, comparison, sorting, list max/min, parity."""

from __future__ import annotations

import random

from lorafleet.tasks.registry import task

_NUMBER = "Answer with the number only."


def _numbers(rng: random.Random, k: int, lo: int = 0, hi: int = 99) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(k)]


def _listed(xs: list[int]) -> str:
    return ", ".join(map(str, xs))


@task("add", f"Add the two numbers. {_NUMBER}", split="seen", kind="arithmetic")
def add(rng: random.Random) -> tuple[str, str]:
    a, b = _numbers(rng, 2)
    return f"{a} + {b}", str(a + b)


@task("subtract", f"Subtract the second number from the first. {_NUMBER}", split="seen", kind="arithmetic")
def subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted(_numbers(rng, 2), reverse=True)
    return f"{a} - {b}", str(a - b)


@task("multiply", f"Multiply the two numbers. {_NUMBER}", split="seen", kind="arithmetic")
def multiply(rng: random.Random) -> tuple[str, str]:
    a, b = _numbers(rng, 2, 2, 12)
    return f"{a} * {b}", str(a * b)


@task("remainder", f"Give the remainder of dividing the first number by the second. {_NUMBER}",
      split="heldout", kind="arithmetic")
def remainder(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return f"{a} divided by {b}", str(a % b)


@task("double", f"Double the number. {_NUMBER}", split="seen", kind="arithmetic")
def double(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(1, 499)
    return str(a), str(2 * a)


@task("km_to_m", f"Convert the distance from kilometres to metres. {_NUMBER}", split="seen", kind="unit conversion")
def km_to_m(rng: random.Random) -> tuple[str, str]:
    km = rng.randint(1, 40)
    return f"{km} km", str(km * 1000)


@task("hours_to_minutes", f"Convert the time from hours to minutes. {_NUMBER}", split="seen",
      kind="unit conversion")
def hours_to_minutes(rng: random.Random) -> tuple[str, str]:
    h = rng.randint(1, 24)
    return f"{h} hours", str(h * 60)


@task("celsius_to_fahrenheit", f"Convert the temperature from Celsius to Fahrenheit. {_NUMBER}", split="seen",
      kind="unit conversion")
def celsius_to_fahrenheit(rng: random.Random) -> tuple[str, str]:
    c = 5 * rng.randint(-8, 20)  # multiples of 5 give whole Fahrenheit degrees
    return f"{c} C", str(c * 9 // 5 + 32)


@task("kg_to_g", f"Convert the mass from kilograms to grams. {_NUMBER}", split="heldout", kind="unit conversion")
def kg_to_g(rng: random.Random) -> tuple[str, str]:
    kg = rng.randint(1, 40)
    return f"{kg} kg", str(kg * 1000)


@task("larger_of_two", f"Which of the two numbers is larger? {_NUMBER}", split="seen", kind="comparison")
def larger_of_two(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(100), 2)
    return f"{a} and {b}", str(max(a, b))


@task("is_greater", "Is the first number greater than the second? Answer yes or no.", split="heldout",
      kind="comparison")
def is_greater(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(100), 2)
    return f"{a} and {b}", "yes" if a > b else "no"


@task("list_max", f"Find the largest number in the list. {_NUMBER}", split="seen", kind="list max/min")
def list_max(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng, rng.randint(3, 6))
    return _listed(xs), str(max(xs))


@task("list_min", f"Find the smallest number in the list. {_NUMBER}", split="heldout", kind="list max/min")
def list_min(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng, rng.randint(3, 6))
    return _listed(xs), str(min(xs))


@task("sort_ascending", "Sort the numbers from smallest to largest, separated by commas.", split="seen",
      kind="sorting")
def sort_ascending(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng, rng.randint(3, 5))
    return _listed(xs), _listed(sorted(xs))


@task("sort_descending", "Sort the numbers from largest to smallest, separated by commas.", split="heldout",
      kind="sorting")
def sort_descending(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng, rng.randint(3, 5))
    return _listed(xs), _listed(sorted(xs, reverse=True))


@task("parity", "Is the number even or odd? Answer even or odd.", split="seen", kind="parity")
def parity(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 999)
    return str(a), "even" if a % 2 == 0 else "odd"


@task("next_number", f"What number comes right after this one? {_NUMBER}", split="seen", kind="counting")
def next_number(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 998)
    return str(a), str(a + 1)


@task("previous_number", f"What number comes right before this one? {_NUMBER}", split="heldout", kind="counting")
def previous_number(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(1, 999)
    return str(a), str(a - 1)
