"""Deterministic, seeded synthetic text-classification tasks (no files, no network).

Both tasks are built so that the label depends on word order, not on which words occur:

* ``pair=False`` (task "synthetic", labels negative=0 / positive=1): two-clause reviews joined
  by a contrast connective, e.g. "The food was not bad, but the service was terrible." The
  label is the polarity of the *dominant* clause (the one after "but"/"however"/a leading
  "although"; the first one before a medial "although"/"even though"), flipped by negation in
  that clause. Both clauses draw from the same positive and negative adjectives, and
  "although" occurs in both dominance patterns, so unigram counts carry little signal.
* ``pair=True`` (task "synthetic_pair", labels entailment=0 / not_entailment=1): a premise
  "the cat chased the dog" (active or passive) and a hypothesis with the same words in
  either voice; entailment iff the roles are kept ("the dog was chased by the cat") and not
  if they are swapped ("the dog chased the cat"). Both classes have the same bag of words.

``simple_fraction`` (single-sentence task only) makes that share of examples one plain clause
("The food was really great."), whose label a bag of words does give away; a bag-of-words
classifier then tops out near ``simple_fraction + (1 - simple_fraction) / 2`` while an
order-aware model can reach 100%. This gives noisy (DP) training an easy part to learn first.

Labels are exactly balanced (before ``label_noise``, which flips each label with that
probability). Same arguments -> identical data.
"""
from __future__ import annotations

import random

from dpbench.data.examples import TextClassificationData
from dpbench.errors import ConfigError

# --- single sentence: contrastive sentiment -------------------------------------------------
NOUNS = ("food", "service", "staff", "music", "room", "view", "coffee", "dessert", "movie",
         "plot", "acting", "ending", "hotel", "price", "location", "soundtrack", "menu", "wine")
POSITIVE = ("great", "excellent", "wonderful", "delightful", "superb", "lovely", "fantastic",
            "good", "charming", "impressive")
NEGATIVE = ("terrible", "awful", "bland", "disappointing", "dreadful", "poor", "bad",
            "mediocre", "boring", "dull")
PLAIN = ("was {}", "was really {}", "was quite {}", "was truly {}", "felt {}")
NEGATED = ("was not {}", "wasn't {}", "was never {}", "was far from {}", "did not feel {}")
# (template, index of the dominant clause)
CONTRASTS = (
    ("{0}, but {1}", 1),
    ("{0}; however, {1}", 1),
    ("although {0}, {1}", 1),
    ("{0}, although {1}", 0),
    ("{0} even though {1}", 0),
    ("{0}, despite the fact that {1}", 0),
)
NEGATION_PROB = 0.5

# --- sentence pair: who did what to whom ----------------------------------------------------
AGENTS = ("cat", "dog", "teacher", "student", "doctor", "nurse", "farmer", "chef", "pilot",
          "lawyer", "boy", "girl", "king", "queen", "child", "neighbor", "singer", "soldier")
MODIFIERS = ("", "", "", "old ", "young ", "tall ", "quiet ", "friendly ", "tired ")
VERBS = (("chased", "chased"), ("helped", "helped"), ("called", "called"),
         ("visited", "visited"), ("praised", "praised"), ("followed", "followed"),
         ("pushed", "pushed"), ("thanked", "thanked"), ("watched", "watched"),
         ("greeted", "greeted"), ("saw", "seen"), ("met", "met"), ("caught", "caught"),
         ("taught", "taught"), ("blamed", "blamed"), ("warned", "warned"), ("hugged", "hugged"),
         ("ignored", "ignored"))
ADVERBIALS = ("", "", "yesterday", "in the park", "after lunch", "on Monday", "at the station")


def make_synthetic(n: int, *, pair: bool, seed: int, label_noise: float = 0.0,
                   simple_fraction: float = 0.0) -> TextClassificationData:
    """``n`` examples of the single-sentence (``pair=False``) or sentence-pair task."""
    if n < 1:
        raise ConfigError(f"synthetic dataset size must be >= 1 (got {n})")
    if not 0.0 <= label_noise <= 0.5:
        raise ConfigError(f"label_noise must be in [0, 0.5] (got {label_noise})")
    if not 0.0 <= simple_fraction <= 1.0 or (pair and simple_fraction):
        raise ConfigError(f"simple_fraction must be in [0, 1] and 0 for the pair task (got {simple_fraction})")
    rng = random.Random(f"dpbench-synthetic-{pair}-{seed}")
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    if pair:
        texts = [_pair_example(rng, y) for y in labels]
    else:
        texts = [_simple_example(rng, y) if rng.random() < simple_fraction else _sentence_example(rng, y)
                 for y in labels]
    labels = [1 - y if rng.random() < label_noise else y for y in labels]
    return TextClassificationData(
        text_a=[a for a, _ in texts],
        text_b=[b for _, b in texts] if pair else None,
        labels=labels,
    )


def _simple_example(rng: random.Random, label: int) -> tuple[str, None]:
    adjective = rng.choice(POSITIVE if label == 1 else NEGATIVE)
    return _sentence(f"the {rng.choice(NOUNS)} " + rng.choice(PLAIN).format(adjective)), None


def _sentence_example(rng: random.Random, label: int) -> tuple[str, None]:
    template, dominant = rng.choice(CONTRASTS)
    clauses = []
    for noun, i in zip(rng.sample(NOUNS, 2), range(2)):
        negated = rng.random() < NEGATION_PROB
        # The dominant clause's polarity (adjective polarity flipped by negation) is the label.
        positive = (label == 1) != negated if i == dominant else rng.random() < 0.5
        adjective = rng.choice(POSITIVE if positive else NEGATIVE)
        clauses.append(f"the {noun} " + rng.choice(NEGATED if negated else PLAIN).format(adjective))
    text = template.format(*clauses)
    return text[0].upper() + text[1:] + ".", None


def _pair_example(rng: random.Random, label: int) -> tuple[str, str]:
    x, y = (rng.choice(MODIFIERS) + a for a in rng.sample(AGENTS, 2))
    verb = rng.choice(VERBS)
    premise = _clause(x, verb, y, passive=rng.random() < 0.5)
    adverbial = rng.choice(ADVERBIALS)
    if adverbial:
        premise += " " + adverbial
    if label == 1:  # not entailment: swap the roles
        x, y = y, x
    hypothesis = _clause(x, verb, y, passive=rng.random() < 0.5)
    return _sentence(premise), _sentence(hypothesis)


def _clause(agent: str, verb: tuple[str, str], patient: str, *, passive: bool) -> str:
    if passive:
        return f"the {patient} was {verb[1]} by the {agent}"
    return f"the {agent} {verb[0]} the {patient}"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."
