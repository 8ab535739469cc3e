"""Data sets: the data that concepts, contexts and contrast pairs are made from, offline.

- :mod:`.verbs`: the Park et al. verb-morphology pairs (packaged under ``steerlens/data``), as
  pair mappings of a tokenizer, and their train/test split by verb;
- :mod:`.contexts`: natural contexts whose next token is a base form, their split by verb, and
  the contrast pairs made from them;
- :mod:`.text`: local natural text (State of the Union addresses, Jane Austen), cleaned and cut
  into sentences; :mod:`.rdata` decodes the R data files the Austen novels ship in;
- :mod:`.countries`: a country–capital task for activation scaling.
"""

from steerlens.datasets.contexts import (
    ContextSplit,
    VerbContext,
    contexts_frame,
    train_test_contexts,
    verb_contexts,
    verb_contrast_pairs,
)
from steerlens.datasets.text import (
    TextSource,
    clean_text,
    iter_sentences,
    load_corpus,
    local_text_sources,
    split_sentences,
)
from steerlens.datasets.verbs import (
    VERB_KINDS,
    load_verb_pairs,
    split_by_verb,
    verb_concept,
    verb_key,
)

__all__ = [
    "VERB_KINDS",
    "ContextSplit",
    "TextSource",
    "VerbContext",
    "clean_text",
    "contexts_frame",
    "iter_sentences",
    "load_corpus",
    "load_verb_pairs",
    "local_text_sources",
    "split_by_verb",
    "split_sentences",
    "train_test_contexts",
    "verb_concept",
    "verb_contexts",
    "verb_contrast_pairs",
    "verb_key",
]
