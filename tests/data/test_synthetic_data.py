"""Synthetic tasks: deterministic, balanced, learnable from word order but not from word counts."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from dpbench.data.examples import TextClassificationData
from dpbench.data.synthetic import AGENTS, POSITIVE, make_synthetic
from dpbench.errors import ConfigError


@pytest.mark.parametrize("pair", [False, True])
def test_deterministic_and_seed_dependent(pair: bool) -> None:
    a = make_synthetic(300, pair=pair, seed=3, label_noise=0.1)
    assert a == make_synthetic(300, pair=pair, seed=3, label_noise=0.1)
    b = make_synthetic(300, pair=pair, seed=4, label_noise=0.1)
    assert a.text_a != b.text_a and a.labels != b.labels
    assert (a.text_b is not None) == pair
    assert len(set(a.text_a)) > 250  # varied sentences, not a handful of templates


@pytest.mark.parametrize("pair", [False, True])
def test_balanced_and_noise(pair: bool) -> None:
    clean = make_synthetic(1001, pair=pair, seed=0)
    assert sorted(Counter(clean.labels).values()) == [500, 501]
    noisy = make_synthetic(1001, pair=pair, seed=0, label_noise=0.2)
    assert noisy.text_a == clean.text_a
    flipped = np.mean(np.array(noisy.labels) != np.array(clean.labels))
    assert 0.15 < flipped < 0.25


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="label_noise must be in"):
        make_synthetic(10, pair=False, seed=0, label_noise=0.7)
    with pytest.raises(ConfigError, match="size must be >= 1"):
        make_synthetic(0, pair=True, seed=0)


# --- the true rules, read off the text alone ---------------------------------------------------

_DOMINANT_CLAUSE = [  # (pattern, group of the dominant clause)
    (r"although (.*), (.*)", 2), (r"(.*), but (.*)", 2), (r"(.*); however, (.*)", 2),
    (r"(.*), although (.*)", 1), (r"(.*) even though (.*)", 1),
    (r"(.*), despite the fact that (.*)", 1),
]


def sentiment_rule(text: str) -> int:
    s = text.lower().rstrip(".")
    clause = next(m.group(g) for p, g in _DOMINANT_CLAUSE if (m := re.fullmatch(p, s)))
    negated = re.search(r"\b(not|never|far from)\b|n't", clause) is not None
    return int((clause.split()[-1] in POSITIVE) != negated)


def agent(text: str) -> str:
    words = text.lower().rstrip(".").split()
    nouns = [w for w in words if w in AGENTS]
    return nouns[1] if "by" in words else nouns[0]


def roles_rule(premise: str, hypothesis: str) -> int:
    return 0 if agent(premise) == agent(hypothesis) else 1  # 0 = entailment


def rule_accuracy(data: TextClassificationData) -> float:
    if data.text_b is None:
        preds = [sentiment_rule(a) for a in data.text_a]
    else:
        preds = [roles_rule(a, b) for a, b in zip(data.text_a, data.text_b)]
    return float(np.mean(np.array(preds) == np.array(data.labels)))


# --- bag-of-words vs order-aware logistic regression -----------------------------------------

def ngrams(text: str, n: int) -> list[str]:
    toks = ["<s>", *re.findall(r"[a-z']+|[,;]", text.lower()), "</s>"]
    return [" ".join(toks[i:i + k]) for k in range(1, n + 1) for i in range(len(toks) - k + 1)]


def features(data: TextClassificationData, n: int) -> list[list[str]]:
    segments = [data.text_a] if data.text_b is None else [data.text_a, data.text_b]
    return [[f"{s}:{g}" for s, seg in enumerate(segments) for g in ngrams(seg[i], n)]
            for i in range(len(data))]


def logreg_dev_accuracy(train: TextClassificationData, dev: TextClassificationData,
                        n: int) -> float:
    """Full-batch L2 logistic regression on n-gram counts (n=1: bag of words)."""
    f_train, f_dev = features(train, n), features(dev, n)
    vocab = {g: j for j, g in enumerate(sorted({g for f in f_train for g in f}))}

    def matrix(fs: list[list[str]]) -> np.ndarray:
        x = np.zeros((len(fs), len(vocab) + 1))
        x[:, -1] = 1.0
        for i, f in enumerate(fs):
            for g in f:
                if g in vocab:
                    x[i, vocab[g]] += 1
        return x

    x, y = matrix(f_train), np.array(train.labels)
    w = np.zeros(x.shape[1])
    for _ in range(300):
        p = 1 / (1 + np.exp(-x @ w))
        w -= 0.5 * (x.T @ (p - y) / len(y) + 1e-3 * w)
    return float(np.mean((matrix(f_dev) @ w > 0) == np.array(dev.labels)))


@pytest.mark.parametrize("pair", [False, True])
def test_labels_follow_word_order_not_word_counts(pair: bool) -> None:
    train = make_synthetic(2000, pair=pair, seed=0)
    dev = make_synthetic(1000, pair=pair, seed=1)
    assert rule_accuracy(train) == rule_accuracy(dev) == 1.0  # label is a function of word order
    bag = logreg_dev_accuracy(train, dev, n=1)
    assert bag < 0.65, f"bag-of-words logistic regression reaches {bag:.3f}"
    if not pair:  # bigrams ("not bad", "but the") already help
        order = logreg_dev_accuracy(train, dev, n=2)
        assert order > bag + 0.1, f"n-gram {order:.3f} vs bag-of-words {bag:.3f}"


def test_rule_tracks_label_noise() -> None:
    noisy = make_synthetic(1000, pair=False, seed=2, label_noise=0.1)
    assert rule_accuracy(noisy) == pytest.approx(0.9, abs=0.04)
