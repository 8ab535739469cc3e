"""A country–capital dataset for activation scaling: "Rome is in" → " Italy".

The facts are public knowledge written out here (no download). :func:`capital_facts` keeps the
ones whose city and country are each one token for the model's tokenizer and that the model
itself gets right (the country is its likeliest next token among all the countries), and pairs
each with a wrong country — another country of the list, the model's likeliest wrong one — the
"France" of Stoehr et al.'s "Rome is in" → Italy vs France.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from steerlens.concepts.tokenization import encode_word, tokenizer_of
from steerlens.errors import ConceptError

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: (city, country): capitals and a few other well-known cities
CITIES: tuple[tuple[str, str], ...] = (
    ("Rome", "Italy"),
    ("Paris", "France"),
    ("Berlin", "Germany"),
    ("Madrid", "Spain"),
    ("Lisbon", "Portugal"),
    ("London", "England"),
    ("Dublin", "Ireland"),
    ("Vienna", "Austria"),
    ("Athens", "Greece"),
    ("Warsaw", "Poland"),
    ("Prague", "Czech"),
    ("Budapest", "Hungary"),
    ("Stockholm", "Sweden"),
    ("Oslo", "Norway"),
    ("Helsinki", "Finland"),
    ("Copenhagen", "Denmark"),
    ("Amsterdam", "Netherlands"),
    ("Brussels", "Belgium"),
    ("Moscow", "Russia"),
    ("Kyiv", "Ukraine"),
    ("Ankara", "Turkey"),
    ("Istanbul", "Turkey"),
    ("Cairo", "Egypt"),
    ("Nairobi", "Kenya"),
    ("Lagos", "Nigeria"),
    ("Tokyo", "Japan"),
    ("Osaka", "Japan"),
    ("Beijing", "China"),
    ("Shanghai", "China"),
    ("Seoul", "Korea"),
    ("Delhi", "India"),
    ("Mumbai", "India"),
    ("Bangkok", "Thailand"),
    ("Hanoi", "Vietnam"),
    ("Jakarta", "Indonesia"),
    ("Manila", "Philippines"),
    ("Sydney", "Australia"),
    ("Melbourne", "Australia"),
    ("Toronto", "Canada"),
    ("Ottawa", "Canada"),
    ("Chicago", "America"),
    ("Mexico", "Mexico"),
    ("Havana", "Cuba"),
    ("Lima", "Peru"),
    ("Santiago", "Chile"),
    ("Bogota", "Colombia"),
    ("Caracas", "Venezuela"),
    ("Tehran", "Iran"),
    ("Baghdad", "Iraq"),
    ("Riyadh", "Saudi"),
)

TEMPLATE = "{city} is a city in the country of"


@dataclass(frozen=True)
class CapitalFact:
    """One prompt with its correct next token and a wrong one to steer towards."""

    city: str
    country: str
    wrong_country: str
    tokens: tuple[int, ...]
    correct_id: int
    wrong_id: int


def capital_facts(
    model: HookedTransformer, template: str = TEMPLATE, cities: Sequence[tuple[str, str]] = CITIES
) -> list[CapitalFact]:
    """The facts of ``cities`` the model knows (see the module docstring), in list order."""
    tok = tokenizer_of(model)
    ids: dict[str, int] = {}
    for _, country in cities:
        piece = encode_word(tok, "▁" + country)
        if len(piece) == 1:
            ids[country] = piece[0]
    if len(ids) < 2:
        raise ConceptError("fewer than two countries are single tokens for this tokenizer")
    names = list(ids)
    candidates = torch.tensor([ids[c] for c in names], device=model.cfg.device)
    facts = []
    for city, country in cities:
        if country not in ids:
            continue
        tokens = model.to_tokens(template.format(city=city))[0]
        with torch.no_grad():
            logits = model(tokens[None])[0, -1, candidates]
        order = logits.argsort(descending=True).tolist()
        if names[order[0]] != country:
            continue
        wrong = names[order[1]]
        facts.append(
            CapitalFact(city, country, wrong, tuple(tokens.tolist()), ids[country], ids[wrong])
        )
    if not facts:
        raise ConceptError("the model knows none of the country facts")
    return facts
