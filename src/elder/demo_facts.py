"""Counterfactual capital-city edits for the demo, built from countryinfo data."""

from __future__ import annotations

import random

from countryinfo import CountryInfo

from elder.data import EditRecord, LocalityProbe
from elder.settings import ConfigError

# Most famous first, so small demos use the capitals a small model most likely knows.
# Names read naturally after "The capital of" (no "the United States" and the like).
_COUNTRIES = (
    "France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil",
    "Canada", "Australia", "Egypt", "Russia", "Mexico", "Argentina", "Kenya", "Norway",
    "Sweden", "Poland", "Greece", "Turkey", "Portugal", "Peru", "Chile", "Thailand",
    "Vietnam", "Ireland", "Austria", "Cuba", "Nigeria", "Iran", "South Korea", "Belgium",
    "Denmark", "Finland", "Hungary", "Colombia", "Morocco", "Indonesia", "Ukraine", "New Zealand",
)

_REPHRASES = (
    "The capital city of {country} is",
    "{country}'s capital is",
    "The seat of government of {country} is",
)

# Far from geography on purpose: these answers should not move when capitals are edited.
_UNRELATED_PROMPTS = (
    "The largest ocean on Earth is the",
    "Water is made of hydrogen and",
    "The chemical symbol for gold is",
    "Romeo and Juliet was written by William",
    "The fastest land animal is the",
    "The planet closest to the Sun is",
    "The Mona Lisa was painted by Leonardo da",
    "The tallest mountain in the world is Mount",
    "A triangle has three",
    "The opposite of hot is",
    "Plants make food from sunlight through",
    "The telephone was invented by Alexander Graham",
    "The largest planet in the solar system is",
    "Honey is made by",
    "The number of days in a week is",
    "The theory of relativity was developed by Albert",
    "On a clear day the sky is",
    "Water boils at sea level at 100 degrees",
    "The first man to walk on the Moon was Neil",
    "A spider has eight",
)


def demo_unrelated_prompts() -> list[str]:
    """Return the fixed prompts whose answers capital edits should not change."""
    return list(_UNRELATED_PROMPTS)


def _capitals() -> list[tuple[str, str]]:
    pairs = []
    for country in _COUNTRIES:
        capital = CountryInfo(country).capital()
        if capital:
            pairs.append((country, capital))
    return pairs


def demo_edits(n: int = 24, seed: int = 0) -> list[EditRecord]:
    """Return n deterministic counterfactual edits "The capital of X is" -> another country's capital."""
    pairs = _capitals()
    if not 2 <= n <= len(pairs):
        raise ConfigError(f"--facts must be between 2 and {len(pairs)} (usable countries), got {n}")
    pairs = pairs[:n]

    # Sattolo's algorithm yields a single n-cycle, so no country keeps its own capital.
    order = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]

    prompts = _UNRELATED_PROMPTS
    records = []
    for i, (country, _) in enumerate(pairs):
        locality = (prompts[(2 * i) % len(prompts)], prompts[(2 * i + 1) % len(prompts)])
        records.append(
            EditRecord(
                id="capital-" + country.lower().replace(" ", "-"),
                prompt=f"The capital of {country} is",
                target=pairs[order[i]][1],
                rephrases=tuple(r.format(country=country) for r in _REPHRASES),
                locality=tuple(LocalityProbe(p) for p in locality),
                subject=country,
            )
        )
    return records
