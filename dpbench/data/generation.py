"""Control-coded text for conditional generation (DistilDP): corpora, control codes, LM batches.

A document is ``"<code>\\n\\n<text>"`` (:func:`format_document`). The code is public
structure, e.g. ``"Business Category: Restaurants | Review Stars: 5.0"``; the text is private.
A teacher LM is fine-tuned on documents with the loss on the text only, then generates text
conditioned on ``prompt_ids(tokenizer, code)``.

Tokenisation (:class:`LMCollator`, :func:`prompt_ids`; once per corpus), the same for every tokenizer:

* The prefix ``code + CODE_SEPARATOR`` and the text are tokenised *separately* with
  ``add_special_tokens=False``, so the prefix ids do not depend on the text and generation
  conditions on exactly the ids seen in training.
* The prefix starts with the tokenizer's BOS id only if the tokenizer itself adds one
  (Llama-style: ``tokenizer("")`` starts with ``bos_token_id``); GPT-2 adds none, so none is
  added. No other special tokens (CLS/SEP) are ever added.
* The text ends with ``eos_token_id`` when the tokenizer has one, so the model learns to stop.
  Truncation to ``max_length`` keeps the first tokens (and may cut off the EOS).
* Padding (right) uses ``pad_token_id``, or ``eos_token_id`` when there is no pad token; padded
  positions are told apart by ``attention_mask``, never by id.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from dpbench.data.batching import eval_batches
from dpbench.data.examples import subset_indices
from dpbench.errors import ConfigError, DataError

CODE_SEPARATOR = "\n\n"
IGNORE_INDEX = -100
YELP_COLUMNS = ("text", "label1", "label2")
YELP_HINT = "set task.data_dir to the folder holding dev.csv/test.csv (e.g. ../shared/data/yelp)"

# Public label sets (the Yelp corpus's documented categories and star ratings), not private counts.
YELP_CATEGORIES = ["Restaurants", "Bars", "Shopping", "Beauty & Spas", "Event Planning & Services",
                   "Hotels & Travel", "Arts & Entertainment", "Health & Medical", "Home & Garden",
                   "Grocery"]
YELP_STARS = ["1.0", "2.0", "3.0", "4.0", "5.0"]


@dataclass
class ControlledCorpus:
    """Parallel lists of control codes and texts; for generated text also the token ids as sampled (the body
    after the prompt, up to its EOS, which is left out). Training then uses those ids, not a re-tokenisation
    of the decoded text, so an on-policy student learns on exactly the sequences it sampled."""

    codes: list[str]
    texts: list[str]
    token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if len(self.codes) != len(self.texts) or (self.token_ids is not None and len(self.token_ids) != len(self.texts)):
            raise DataError(f"codes, texts and token ids have different lengths ({len(self.codes)}, "
                            f"{len(self.texts)}, {len(self.token_ids or [])}); build ControlledCorpus from parallel lists")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None, seed: int) -> ControlledCorpus:
        """A random subset of ``n`` documents drawn without replacement (kept in original order).

        ``n`` None or >= len(self) returns ``self`` unchanged.
        """
        idx = subset_indices(len(self), n, seed)
        return self if idx is None else self._take(idx)

    def split_off(self, n: int, seed: int) -> tuple[ControlledCorpus, ControlledCorpus]:
        """(the rest, a seeded random ``n`` held out): a tuning split carved from the training corpus."""
        if not 0 < n < len(self):
            raise ConfigError(f"task.holdout_examples must be in [1, {len(self) - 1}] (got {n})")
        held = set(subset_indices(len(self), n, seed) or [])
        return self._take([i for i in range(len(self)) if i not in held]), self._take(sorted(held))

    def _take(self, idx: list[int]) -> ControlledCorpus:
        ids = None if self.token_ids is None else [self.token_ids[i] for i in idx]
        return ControlledCorpus([self.codes[i] for i in idx], [self.texts[i] for i in idx], ids)


def format_code(category: str, stars: str) -> str:
    """The control code of a (category, stars) pair, as in the Yelp files' label columns."""
    return f"Business Category: {category} | Review Stars: {stars}"


def format_document(code: str, text: str) -> str:
    """One training document: ``code + CODE_SEPARATOR + text``."""
    return code + CODE_SEPARATOR + text


# -- Yelp ---------------------------------------------------------------------------------------
def load_yelp(path: str | Path) -> ControlledCorpus:
    """Read one Yelp CSV (columns text,label1,label2); code = ``f"{label1} | {label2}"``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; {YELP_HINT}")
    codes: list[str] = []
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if header is None:
                raise DataError(f"{path} is empty; {YELP_HINT}")
            missing = [c for c in YELP_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{path} lacks column(s) {', '.join(missing)} (header: "
                                f"{','.join(header)[:80]!r}); expected text,label1,label2 ({YELP_HINT})")
            for row in reader:
                values = [row.get(c) for c in YELP_COLUMNS]
                if any(v is None for v in values):
                    raise DataError(f"{path} line {reader.line_num}: too few fields; fix or remove "
                                    f"that row (expected text,label1,label2)")
                text, label1, label2 = values
                codes.append(f"{label1} | {label2}")
                texts.append(text)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                        f"re-save it as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e}); re-create the file ({YELP_HINT})") from None
    if not texts:
        raise DataError(f"{path} has a header but no reviews; {YELP_HINT}")
    return ControlledCorpus(codes, texts)


# -- synthetic review-like corpus ----------------------------------------------------------------
SYNTHETIC_CATEGORIES = {
    "Bakery": ("croissant", "sourdough", "cupcake", "baguette", "cinnamon roll", "pastry"),
    "Bike Repair": ("tune-up", "brake job", "wheel truing", "chain", "mechanic", "repair"),
    "Bookshop": ("novel", "poetry section", "used books", "reading nook", "bookseller", "selection"),
    "Car Wash": ("wax", "interior detailing", "rinse", "vacuum", "tire shine", "wash"),
}
SYNTHETIC_STARS = YELP_STARS
_ADJECTIVES = {
    "1.0": ("awful", "terrible", "dirty", "overpriced"),
    "2.0": ("disappointing", "mediocre", "slow", "bland"),
    "3.0": ("okay", "average", "decent", "fine"),
    "4.0": ("good", "nice", "friendly", "solid"),
    "5.0": ("amazing", "excellent", "perfect", "wonderful"),
}
_CLOSINGS = {
    "1.0": ("Never coming back.", "Avoid this place."),
    "2.0": ("Probably not coming back.", "Expected more."),
    "3.0": ("Might come back.", "Nothing special."),
    "4.0": ("Will come back.", "Worth a visit."),
    "5.0": ("Highly recommend!", "Best in town!"),
}
_TEMPLATES = ("The {noun} was {adj}.", "I found the {noun} {adj}.", "Their {noun} is really {adj}.",
              "What a {adj} {noun}.")


def make_synthetic_corpus(n: int, seed: int = 0) -> ControlledCorpus:
    """``n`` seeded review-like documents whose words depend on the code.

    Codes are ``"Business Category: <c> | Review Stars: <k>.0"`` (uniform over
    :data:`SYNTHETIC_CATEGORIES` x stars); each text has 1-3 sentences naming the category's
    nouns with star-dependent adjectives, sometimes ending with a star-dependent closing, so a
    model that reads the code predicts the text better. Same arguments -> identical corpus.
    """
    if n < 1:
        raise ConfigError(f"synthetic corpus size must be >= 1 (got {n})")
    rng = random.Random(f"dpbench-synthetic-lm-{seed}")
    categories = list(SYNTHETIC_CATEGORIES)
    codes, texts = [], []
    for _ in range(n):
        category, stars = rng.choice(categories), rng.choice(SYNTHETIC_STARS)
        codes.append(format_code(category, stars))
        texts.append(_synthetic_text(rng, category, stars))
    return ControlledCorpus(codes, texts)


def _synthetic_text(rng: random.Random, category: str, stars: str) -> str:
    k = rng.randint(1, 3)
    closing = k > 1 and rng.random() < 0.5
    nouns = SYNTHETIC_CATEGORIES[category]
    sentences = [rng.choice(_TEMPLATES).format(noun=rng.choice(nouns), adj=rng.choice(_ADJECTIVES[stars]))
                 for _ in range(k - closing)]
    if closing:
        sentences.append(rng.choice(_CLOSINGS[stars]))
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def public_codes(name: str) -> list[str]:
    """Every control code of a task's public code space (label sets only, never private counts)."""
    spaces = {"yelp": (YELP_CATEGORIES, YELP_STARS),
              "synthetic_lm": (list(SYNTHETIC_CATEGORIES), SYNTHETIC_STARS)}
    if name not in spaces:
        raise ConfigError(f"unknown control-code prior {name!r}; set task.codes to one of: {', '.join(spaces)}")
    categories, stars = spaces[name]
    return [format_code(c, s) for c in categories for s in stars]


# -- tokenisation and batches --------------------------------------------------------------------
def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts sequences with its BOS token (Llama yes, GPT-2 no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, code: str) -> list[int]:
    """Token ids of ``code + CODE_SEPARATOR`` (with BOS if the tokenizer adds one), as in training."""
    ids = tokenizer(code + CODE_SEPARATOR, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if adds_bos(tokenizer) else []) + list(ids)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """``pad_token_id``, else ``eos_token_id``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return pad


class LMCollator:
    """(code, text) pairs -> right-padded causal-LM batch with the loss on the text only.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (all (B, T) long; labels are -100 on
    the prefix and on padding) and ``prefix_len`` (B,) long, the prefix tokens kept per row.
    An empty list gives a (0, 1) batch. :meth:`encode` tokenises (once per corpus, in
    :class:`LMDataset`), :meth:`pad` batches encoded rows.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        if max_length < 1:
            raise ConfigError(f"max_length must be >= 1 (got {max_length})")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_token_id = pad_id(tokenizer)
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self._prefixes: dict[str, list[int]] = {}  # codes repeat a lot

    def _prefix(self, code: str) -> list[int]:
        if code not in self._prefixes:
            self._prefixes[code] = prompt_ids(self.tokenizer, code)
        return self._prefixes[code]

    def encode(self, docs: Sequence[tuple[str, str]], bodies: Sequence[Sequence[int]] | None = None
               ) -> list[tuple[Tensor, int]]:
        """(ids, prefix length kept) per document, truncated to ``max_length``; ``bodies``: the texts'
        token ids when known (sampled), else the texts are tokenised."""
        if bodies is None:
            bodies = self.tokenizer([t for _, t in docs], add_special_tokens=False)["input_ids"] if docs else []
        rows = []
        for (code, _), body in zip(docs, bodies):
            prefix = self._prefix(code)
            ids = (prefix + list(body) + self.eos)[: self.max_length]
            rows.append((torch.tensor(ids, dtype=torch.long), min(len(prefix), self.max_length)))
        return rows

    def pad(self, rows: Sequence[tuple[Tensor, int]]) -> dict[str, Tensor]:
        if not rows:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty, "labels": torch.full((0, 1), IGNORE_INDEX),
                    "prefix_len": torch.zeros(0, dtype=torch.long)}
        seqs = [ids for ids, _ in rows]
        ids = pad_sequence(seqs, batch_first=True, padding_value=self.pad_token_id)
        mask = pad_sequence([torch.ones_like(r) for r in seqs], batch_first=True)
        prefix_len = torch.tensor([p for _, p in rows], dtype=torch.long)
        pos = torch.arange(ids.shape[1])
        labels = ids.masked_fill((pos < prefix_len[:, None]) | (mask == 0), IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prefix_len": prefix_len}

    def __call__(self, docs: Sequence[tuple[str, str]]) -> dict[str, Tensor]:
        return self.pad(self.encode(docs))


class LMDataset(Dataset):
    """A :class:`ControlledCorpus` tokenised once (or taken as sampled), as :meth:`LMCollator.encode` rows."""

    def __init__(self, corpus: ControlledCorpus, collator: LMCollator) -> None:
        self.rows = collator.encode(list(zip(corpus.codes, corpus.texts)), corpus.token_ids)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.rows[i]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self.rows]


def lm_loader(corpus: ControlledCorpus, tokenizer: PreTrainedTokenizerBase, max_length: int,
              batch_sampler: Sampler[list[int]] | None = None, batch_size: int | None = None,
              shuffle: bool = False) -> DataLoader:
    """DataLoader of :class:`LMCollator` batches of ``corpus`` (tokenised once): from ``batch_sampler``
    (lists of indices, e.g. Poisson batches for DP) or ``batch_size`` batches (grouped by length, or
    shuffled with ``shuffle``); give exactly one of the two."""
    collate = LMCollator(tokenizer, max_length)
    if (batch_sampler is None) == (batch_size is None):
        raise ConfigError("lm_loader needs exactly one of batch_sampler or batch_size")
    if batch_sampler is not None and shuffle:
        raise ConfigError("shuffle=True conflicts with batch_sampler; the sampler decides the order")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    data = LMDataset(corpus, collate)
    if batch_sampler is None and shuffle:
        return DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate.pad)
    if batch_sampler is None:
        batch_sampler = eval_batches(data.lengths, batch_size)
    return DataLoader(data, batch_sampler=batch_sampler, collate_fn=collate.pad)
