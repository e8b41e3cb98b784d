"""Build the demo instruction dataset (train.jsonl, validation.jsonl) from the seed files in seed/.

The rows are the hand-written ones in seed/hand_written.jsonl plus rows made from small templates whose
answers are computed here (arithmetic, unit conversions, string tasks, sorting, capitals, dates, JSON
look-ups); the templates draw their names, words and other lookup values from seed/tables.json, and the
system prompts they use from seed/system_prompts.json. Standard library only and seeded: a rerun
reproduces the shipped files byte for byte (tests/test_demo_data.py checks this).

Usage: python data/demo/build_demo_data.py [--out DIR]    (DIR defaults to data/demo/)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEED_DIR = HERE / "seed"
SEED = 20240611
N_TOTAL = 360
N_VALIDATION = 40  # every 9th row of a category-stratified ordering goes to validation
SYSTEM_RATE = 0.2  # share of generated rows that get a system prompt (and its short answer)

Row = dict[str, str]
# What a template returns: instruction, input, full answer, short answer, name of the system prompt
# that asks for the short answer. The caller picks one of the two answers.
Item = tuple[str, str, str, str, str]

T: dict[str, Any] = json.loads((SEED_DIR / "tables.json").read_text(encoding="utf-8"))
PROMPTS: dict[str, str] = json.loads((SEED_DIR / "system_prompts.json").read_text(encoding="utf-8"))
CAPITALS: list[tuple[str, str]] = list(T["capitals"].items())
dumps = partial(json.dumps, ensure_ascii=False)  # keeps "Bogotá" readable in the files


def make_row(instruction: str, input_text: str, output: str, system: str | None = None) -> Row:
    # Key order is part of the byte-exact output: system (if any), instruction, input, output.
    row = {"system": system} if system is not None else {}
    return row | {"instruction": instruction, "input": input_text, "output": output}


def fmt_num(value: Fraction) -> str:
    """Exact decimal with thousands separators: 3500 -> '3,500', 5/2 -> '2.5'.

    Only for values with a short exact decimal form, which is all gen_units draws."""
    return f"{Decimal(value.numerator) / Decimal(value.denominator):,}"


# Templates. The order of rng calls in each one fixes the shipped data: keep it when editing.


def gen_arithmetic(rng: random.Random, sys_: bool) -> Item:
    name, item = rng.choice(T["names"]), rng.choice(T["items"])
    kind = rng.choice(["add", "sub", "mul", "div", "price", "change", "percent", "time"])
    if kind == "add":
        a, b = rng.randint(3, 60), rng.randint(2, 40)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        ans, full = a + b, f"{name} now has {a} + {b} = {a + b} {item}."
    elif kind == "sub":
        a = rng.randint(10, 80)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?"
        ans, full = a - b, f"{name} has {a} - {b} = {a - b} {item} left."
    elif kind == "mul":
        a, b = rng.randint(3, 15), rng.randint(2, 12)
        q = f"A box holds {a} {item}. How many {item} are there in {b} boxes?"
        ans, full = a * b, f"{b} boxes hold {b} x {a} = {a * b} {item}."
    elif kind == "div":
        b, k = rng.randint(2, 9), rng.randint(2, 12)
        q = f"{b * k} {item} are shared equally among {b} children. How many {item} does each child get?"
        ans, full = k, f"Each child gets {b * k} / {b} = {k} {item}."
    elif kind == "price":
        p, n = rng.randint(2, 25), rng.randint(2, 9)
        q = f"One notebook costs ${p}. How much do {n} notebooks cost?"
        ans, full = f"${p * n}", f"{n} notebooks cost {n} x ${p} = ${p * n}."
    elif kind == "change":
        note = rng.choice([10, 20, 50, 100])
        cost = rng.randint(1, note - 1)
        q = f"{name} pays for a ${cost} item with a ${note} note. How much change should {name} get?"
        ans, full = f"${note - cost}", f"{name} should get ${note} - ${cost} = ${note - cost} in change."
    elif kind == "percent":
        pct = rng.choice([5, 10, 20, 25, 50, 75])
        base = rng.randint(1, 20) * (100 // math.gcd(pct, 100))  # a base that gives a whole answer
        q, ans = f"What is {pct}% of {base}?", base * pct // 100
        full = f"{pct}% of {base} is {ans}."
    else:  # time
        h, m, dur = rng.randint(8, 18), rng.choice(range(0, 60, 5)), rng.choice(range(25, 180, 5))
        end = h * 60 + m + dur
        ans = f"{end // 60:02d}:{end % 60:02d}"
        q = f"A film starts at {h:02d}:{m:02d} and lasts {dur} minutes. At what time does it end?"
        full = f"The film ends at {ans}."
    return q, "", full, str(ans), "math_tutor"


def gen_units(rng: random.Random, sys_: bool) -> Item:
    if rng.random() < 0.2:  # temperature: Celsius multiples of 5 give whole Fahrenheit values
        c = rng.choice(range(-20, 45, 5))
        cel, fah = f"{c} degrees Celsius", f"{c * 9 // 5 + 32} degrees Fahrenheit"
        src, dst = (cel, fah) if rng.random() < 0.5 else (fah, cel)
    else:
        frm, to, factor_text = rng.choice(T["conversions"])
        factor, result = Fraction(factor_text), Fraction(1)
        while result == 1:  # "1 metres" reads badly: draw again
            if factor >= 1:  # whole numbers, or halves one time in four
                whole = rng.random() < 0.75
                value = Fraction(rng.randint(2, 40)) if whole else Fraction(rng.randint(3, 19), 2)
            elif factor == Fraction(1, 60):  # whole quarter hours
                value = Fraction(rng.randint(5, 20) * 15)
            elif factor == Fraction(1, 100):
                value = Fraction(rng.randint(3, 60) * 10)
            else:  # thousandths: multiples of 250 keep the result short
                value = Fraction(rng.randint(3, 60) * 250)
            result = value * factor
        src, dst = f"{fmt_num(value)} {frm}", f"{fmt_num(result)} {to}"
    target = dst.split(" ", 1)[1]  # the unit, without the number
    if rng.random() < 0.5:
        q, inp = f"Convert {src} to {target}.", ""
    else:
        q, inp = f"Convert the following measurement to {target}.", src
    return q, inp, f"{src} is {dst}.", dst, "value_unit"


def gen_reverse(rng: random.Random, sys_: bool) -> Item:
    word = rng.choice(T["words"])
    if rng.random() < 0.5:
        q, inp = "Reverse the letters of the given word.", word
    else:
        q, inp = f"Write the word '{word}' backwards.", ""
    return q, inp, f"'{word}' written backwards is '{word[::-1]}'.", word[::-1], "answer_only"


def gen_count_letters(rng: random.Random, sys_: bool) -> Item:
    sentence = rng.choice(T["sentences"])
    letter = rng.choice(sorted({ch for ch in sentence.lower() if ch.isalpha()}))
    n = sentence.lower().count(letter)
    q = f"How many times does the letter '{letter}' appear in the text below? Ignore upper and lower case."
    times = "once" if n == 1 else f"{n} times"
    return q, sentence, f"The letter '{letter}' appears {times}.", str(n), "number_only"


def gen_count_words(rng: random.Random, sys_: bool) -> Item:
    sentence = rng.choice(T["sentences"])
    q = rng.choice(T["word_count_questions"])
    n = len(sentence.split())
    return q, sentence, f"The sentence has {n} words.", str(n), "number_only"


def gen_sort(rng: random.Random, sys_: bool) -> Item:
    k = rng.randint(4, 8)
    nums = rng.sample(range(-20 if rng.random() < 0.25 else 0, 100), k)
    descending = rng.random() < 0.35
    q = f"Sort these numbers in {'descending' if descending else 'ascending'} order."
    out = ", ".join(map(str, sorted(nums, reverse=descending)))
    return q, ", ".join(map(str, nums)), out, out, "answer_only"


def gen_capital(rng: random.Random, sys_: bool) -> Item:
    country, city = rng.choice(CAPITALS)
    if rng.random() < 0.6:
        q, full, short = f"What is the capital of {country}?", f"The capital of {country} is {city}.", city
    else:
        q, full = f"{city} is the capital of which country?", f"{city} is the capital of {country}."
        short = country[0].upper() + country[1:]  # "the Philippines" -> "The Philippines"
    if sys_ and rng.random() >= 0.5:  # half the system rows keep the sentence, under a "concise" prompt
        return q, "", full, full, "concise"
    return q, "", full, short, "one_name"


def gen_date(rng: random.Random, sys_: bool) -> Item:
    d = dt.date.fromordinal(rng.randint(dt.date(1985, 1, 1).toordinal(), dt.date(2030, 12, 31).toordinal()))
    iso, month, weekday = d.isoformat(), T["months"][d.month - 1], T["weekdays"][d.weekday()]
    dmy, us = f"{d.day:02d}/{d.month:02d}/{d.year}", f"{d.month:02d}/{d.day:02d}/{d.year}"
    long, words = f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}"
    # (instruction, input, short answer, full answer); only the list's length matters to the rng.
    q, inp, short, full = rng.choice(
        [
            ("Convert this date from YYYY-MM-DD to DD/MM/YYYY format.", iso, dmy, f"{iso} is {dmy} in DD/MM/YYYY format."),
            ("Write this ISO date in the form 'Month D, YYYY'.", iso, long, f"{iso} is {long}."),
            ("Convert this date to ISO 8601 format (YYYY-MM-DD).", words, iso, f"{words} is {iso} in ISO 8601 format."),
            ("This date is written in US format (MM/DD/YYYY). Convert it to YYYY-MM-DD.", us, iso, f"{us} in US format is {iso}."),
            ("What day of the week is this date?", long, weekday, f"{long} is a {weekday}."),
        ]
    )  # fmt: skip
    return q, inp, full, short, "answer_only"


def gen_json(rng: random.Random, sys_: bool) -> Item:
    kind = rng.choice(["flat", "flat", "nested", "keys", "array"])
    if kind in ("flat", "keys"):
        names, cities = T["first_names"], T["cities"]
        obj = {"name": rng.choice(names), "age": rng.randint(18, 80), "city": rng.choice(cities)}
        if rng.random() < 0.5:
            obj["active"] = rng.random() < 0.5
        if rng.random() < 0.4:
            obj["score"] = rng.randint(0, 100)
        if kind == "keys":
            q, keys = "List the top-level keys of this JSON object, in order.", list(obj)
            return q, dumps(obj), ", ".join(keys), dumps(keys), "json_only"
        key = rng.choice(list(obj))
        q, value = f'What is the value of the key "{key}" in this JSON object?', obj[key]
        return q, dumps(obj), f'The value of "{key}" is {dumps(value)}.', dumps({key: value}), "json_only"
    if kind == "nested":
        customer = {"name": rng.choice(T["first_names"]), "city": rng.choice(T["cities"])}
        doc = {"order": {"id": rng.randint(1000, 9999), "items": rng.randint(1, 9), "customer": customer}}
        path = rng.choice(["order.id", "order.items", "order.customer.name", "order.customer.city"])
        value: Any = doc
        for part in path.split("."):
            value = value[part]
        q = f"In the JSON below, what is the value at the path {path}?"
        return q, dumps(doc), f"The value at {path} is {dumps(value)}.", dumps({"value": value}), "json_only"
    tags = rng.sample(T["tags"], rng.randint(1, 5))
    product = {"product": rng.choice(T["products"]), "price": rng.randint(5, 120), "tags": tags}
    q, n = 'How many elements are in the "tags" array of this JSON object?', len(tags)
    full = f'The "tags" array has {n} element{"" if n == 1 else "s"}.'
    return q, dumps(product), full, dumps({"count": n}), "json_only"


# Generated categories and their relative weights (hand-written rows fill the rest of N_TOTAL first).
GENERATORS: list[tuple[str, Callable[[random.Random, bool], Item], int]] = [
    ("arithmetic", gen_arithmetic, 40),
    ("units", gen_units, 30),
    ("reverse", gen_reverse, 20),
    ("count_letters", gen_count_letters, 18),
    ("count_words", gen_count_words, 16),
    ("sort", gen_sort, 22),
    ("capital", gen_capital, 30),
    ("date", gen_date, 30),
    ("json", gen_json, 26),
]


def build_rows(rng: random.Random) -> list[tuple[str, Row]]:
    """(category, row) pairs: every hand-written row, then generated rows up to N_TOTAL, all unique."""
    tagged: list[tuple[str, Row]] = []
    seen: set[tuple[str, str]] = set()

    def add(category: str, row: Row) -> bool:
        if (row["instruction"], row["input"]) in seen:
            return False
        seen.add((row["instruction"], row["input"]))
        tagged.append((category, row))
        return True

    with (SEED_DIR / "hand_written.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            s = json.loads(line)
            if not add(s["category"], make_row(s["instruction"], s["input"], s["output"], s.get("system"))):
                raise ValueError(f"duplicate hand-written row: {s['instruction']!r}")

    n_generated = N_TOTAL - len(tagged)
    total_weight = sum(w for _, _, w in GENERATORS)
    quotas = [n_generated * w // total_weight for _, _, w in GENERATORS]
    for i in range(n_generated - sum(quotas)):  # hand out the rounding remainder
        quotas[i % len(quotas)] += 1
    for (category, gen, _), quota in zip(GENERATORS, quotas, strict=True):
        attempts = 0
        while quota > 0:
            if (attempts := attempts + 1) > 10_000:
                raise RuntimeError(f"could not generate enough unique rows for {category}")
            sys_ = rng.random() < SYSTEM_RATE
            q, inp, full, short, prompt = gen(rng, sys_)
            row = make_row(q, inp, short, PROMPTS[prompt]) if sys_ else make_row(q, inp, full)
            quota -= add(category, row)
    return tagged


def split(rng: random.Random, tagged: list[tuple[str, Row]]) -> tuple[list[Row], list[Row]]:
    """Stratified split: order rows by category (shuffled within it), send every k-th to validation."""
    by_cat: dict[str, list[Row]] = {}
    for category, row in tagged:
        by_cat.setdefault(category, []).append(row)
    ordered: list[Row] = []
    for rows in by_cat.values():  # insertion order: deterministic
        rng.shuffle(rows)
        ordered.extend(rows)
    step = len(ordered) // N_VALIDATION
    val_idx = set(range(step // 2, step // 2 + step * N_VALIDATION, step))
    train = [r for i, r in enumerate(ordered) if i not in val_idx]
    validation = [r for i, r in enumerate(ordered) if i in val_idx]
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: %(default)s)")
    out: Path = parser.parse_args(argv).out
    rng = random.Random(SEED)
    train, validation = split(rng, build_rows(rng))
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation)):
        with (out / f"{name}.jsonl").open("w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(dumps(row) + "\n" for row in rows)
        print(f"{name}: {len(rows)} rows ({sum('system' in r for r in rows)} with a system prompt)")


if __name__ == "__main__":
    main()
