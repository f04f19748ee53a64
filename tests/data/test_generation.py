"""Control-coded corpora (Yelp, synthetic), the LM collator and the perplexity metric."""
from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

from conftest import TINY
from dpbench.data.generation import (CODE_SEPARATOR, YELP_CATEGORIES, ControlledCorpus, LMCollator,
                                     format_document, lm_loader, load_yelp, make_synthetic_corpus,
                                     prompt_ids, public_codes)
from dpbench.data.perplexity import nll_per_token, perplexity, sliding_windows
from dpbench.errors import ConfigError, DataError
from dpbench.models.tokenizers import load_tokenizer
from dpbench.privacy.sampling import PoissonBatchSampler

DOCS = [("Business Category: Bars | Review Stars: 5.0", "Great beer, friendly staff."),
        ("Business Category: Grocery | Review Stars: 1.0", "Rude.\nNever again"),
        ("Business Category: Hotels & Travel | Review Stars: 3.0", "")]


@pytest.fixture(scope="module")
def tok() -> GPT2TokenizerFast:
    """GPT-2 BPE: no BOS added, EOS = pad = 50256."""
    return load_tokenizer(TINY["gpt2"]["tokenizer"], TINY["gpt2"]["tokenizer_kind"])


@pytest.fixture(scope="module")
def bos_tok(tok: GPT2TokenizerFast) -> GPT2TokenizerFast:
    """The same BPE, Llama-style: adds BOS and has no pad token."""
    t = copy.deepcopy(tok)
    t.add_bos_token, t.pad_token = True, None
    assert t.pad_token_id is None and t("x")["input_ids"][0] == t.bos_token_id
    return t


def causal_lm(family: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=64))
    return model.double()


# -- Yelp ------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_load_yelp_small_file_with_quoting(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "dev.csv", [
        ["text", "label1", "label2"],
        ['Good, "cheap" food.\nCome back!', "Business Category: Restaurants", "Review Stars: 4.0"],
        ["Meh", "Business Category: Bars", "Review Stars: 2.0"],
    ])
    corpus = load_yelp(path)
    assert len(corpus) == 2
    assert corpus.texts == ['Good, "cheap" food.\nCome back!', "Meh"]
    assert corpus.codes == ["Business Category: Restaurants | Review Stars: 4.0",
                            "Business Category: Bars | Review Stars: 2.0"]
    assert set(corpus.codes) <= set(public_codes("yelp"))
    assert format_document(corpus.codes[1], "Meh") == "Business Category: Bars | Review Stars: 2.0\n\nMeh"


@pytest.mark.parametrize("content,match", [
    (None, "not found; set task.data_dir"),
    ("", "is empty"),
    ("text,label1,label2\n", "no reviews"),
    ("text,label\nhi,1\n", "lacks column"),
    ("text,label1,label2\nhi,Business Category: Bars\n", "line 2: too few fields"),
])
def test_load_yelp_bad_files(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "dev.csv"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match) as e:
        load_yelp(path)
    assert "\n" not in str(e.value)


@pytest.mark.shared_data
def test_load_yelp_real_dev(shared_data: Path) -> None:
    path = shared_data / "yelp" / "dev.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    corpus = load_yelp(path)
    assert len(corpus) == 5000
    categories = {c.split(" | ")[0].removeprefix("Business Category: ") for c in corpus.codes}
    assert len(categories) == 10 and categories <= set(YELP_CATEGORIES)
    assert set(corpus.codes) <= set(public_codes("yelp"))
    assert all(corpus.texts)
    sub = corpus.subset(100, seed=1)
    assert len(sub) == 100 and sub.codes == corpus.subset(100, seed=1).codes
    assert sub.texts != corpus.subset(100, seed=2).texts


def test_public_codes() -> None:
    yelp = public_codes("yelp")
    assert len(yelp) == len(set(yelp)) == 50
    assert "Business Category: Beauty & Spas | Review Stars: 1.0" in yelp
    assert len(public_codes("synthetic_lm")) == len(set(public_codes("synthetic_lm")))
    with pytest.raises(ConfigError, match="task.codes"):
        public_codes("nope")


def test_controlled_corpus_checks_and_subset() -> None:
    with pytest.raises(DataError, match="parallel"):
        ControlledCorpus(["a"], [])
    corpus = ControlledCorpus([str(i) for i in range(10)], [f"t{i}" for i in range(10)])
    assert corpus.subset(None, seed=0) is corpus and corpus.subset(20, seed=0) is corpus
    sub = corpus.subset(4, seed=3)
    assert len(sub) == 4 and len(set(sub.codes)) == 4
    assert all(t == f"t{c}" for c, t in zip(sub.codes, sub.texts))  # pairs stay together
    with pytest.raises(ConfigError):
        corpus.subset(0, seed=0)


def test_yelp_holdout_is_carved_from_the_training_file_and_never_reads_the_test_file(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from dpbench.methods.distildp import load_generation_task
    rows = [["text", "label1", "label2"]] + [[f"review {i}", "Business Category: Bars", "Review Stars: 3.0"]
                                             for i in range(30)]
    write_csv(tmp_path / "dev.csv", rows)  # no test.csv: a read of it would fail
    task = OmegaConf.create({"name": "yelp", "kind": "generation", "data_dir": str(tmp_path), "train_file": "dev.csv",
                             "eval_file": "test.csv", "max_train_examples": 12, "holdout_examples": 8,
                             "holdout_seed": 1, "codes": "yelp"})
    train, held, _ = load_generation_task(task, seed=0)
    assert len(train) == 12 and len(held) == 8 and not set(train.texts) & set(held.texts)
    assert held.texts == load_generation_task(task, seed=5)[1].texts  # the split is the holdout seed's, not the run's
    assert train.texts != load_generation_task(task, seed=5)[0].texts
    corpus = load_yelp(tmp_path / "dev.csv")
    rest, held2 = corpus.split_off(8, seed=1)
    assert held2.texts == held.texts and sorted(rest.texts + held2.texts) == sorted(corpus.texts)
    with pytest.raises(ConfigError, match="holdout_examples"):
        corpus.split_off(30, seed=0)


# -- synthetic corpus ------------------------------------------------------------------------------
def test_synthetic_corpus_deterministic_and_code_dependent() -> None:
    a, b = make_synthetic_corpus(300, seed=0), make_synthetic_corpus(300, seed=0)
    assert a == b
    assert make_synthetic_corpus(300, seed=1) != a
    assert set(a.codes) <= set(public_codes("synthetic_lm"))
    assert len(set(a.codes)) == len(public_codes("synthetic_lm"))  # all codes show up in 300 draws
    for code, text in zip(a.codes, a.texts):
        assert 1 <= text.count(".") + text.count("!") <= 3
        if "Review Stars: 5.0" in code:
            assert not any(w in text for w in ("awful", "terrible", "mediocre"))
    with pytest.raises(ConfigError):
        make_synthetic_corpus(0)


# -- collator --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tok", "bos_tok"])
def test_lm_collator_masks_prefix_and_padding(which: str, request: pytest.FixtureRequest) -> None:
    t = request.getfixturevalue(which)
    batch = LMCollator(t, max_length=64)(DOCS)
    ids, mask, labels, plen = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prefix_len"]
    assert ids.dtype == labels.dtype == plen.dtype == torch.long and ids.shape == mask.shape == labels.shape
    assert plen.shape == (len(DOCS),)
    for r, (code, text) in enumerate(DOCS):
        prefix = prompt_ids(t, code)
        assert plen[r] == len(prefix) and ids[r, : len(prefix)].tolist() == prefix
        if which == "bos_tok":
            assert prefix[0] == t.bos_token_id
        pos = torch.arange(ids.shape[1])
        masked = (pos < plen[r]) | (mask[r] == 0)
        assert torch.equal(labels[r] == -100, masked)
        assert torch.equal(labels[r][~masked], ids[r][~masked])
        kept = labels[r][labels[r] != -100].tolist()
        assert kept[-1] == t.eos_token_id  # labelled although EOS doubles as padding
        assert t.decode(kept) == text + t.eos_token
        assert t.decode(ids[r, : int(mask[r].sum())]).endswith(code + CODE_SEPARATOR + text + t.eos_token)
    assert (ids[mask == 0] == t.eos_token_id).all()  # pad falls back to EOS / is EOS


def test_lm_collator_truncates_and_handles_empty(tok: GPT2TokenizerFast) -> None:
    batch = LMCollator(tok, max_length=14)(DOCS)
    assert batch["input_ids"].shape[1] <= 14
    assert batch["prefix_len"].tolist() == [min(len(prompt_ids(tok, c)), 14) for c, _ in DOCS]
    short = LMCollator(tok, max_length=3)(DOCS[:1])
    assert short["prefix_len"].tolist() == [3] and (short["labels"] == -100).all()
    empty = LMCollator(tok, max_length=8)([])
    assert empty["input_ids"].shape == empty["labels"].shape == (0, 1) and empty["prefix_len"].shape == (0,)


def test_lm_loader_with_poisson_sampler_and_batch_size(tok: GPT2TokenizerFast) -> None:
    corpus = make_synthetic_corpus(20, seed=0)
    sampler = PoissonBatchSampler(num_samples=len(corpus), sample_rate=0.3, steps=3, seed=0)
    batches = list(lm_loader(corpus, tok, 32, batch_sampler=sampler))
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == len(i) for b, i in zip(batches, sampler))
    fixed = list(lm_loader(corpus, tok, 32, batch_size=8))
    assert [b["input_ids"].shape[0] for b in fixed] == [8, 8, 4]
    with pytest.raises(ConfigError):
        lm_loader(corpus, tok, 32)


# -- perplexity ------------------------------------------------------------------------------------
TEXTS = ["The croissant was amazing. Best in town!", "I found the wash awful.", "What a decent novel."]


def hand_nll(model: torch.nn.Module, ids: list[int], begin: int, j: int) -> float:
    """-log p(ids[j] | ids[begin:j]) by one plain forward pass."""
    x = torch.tensor([ids[begin:j]])
    logits = model(input_ids=x, position_ids=torch.arange(x.shape[1])[None]).logits[0, -1]
    return float(-torch.log_softmax(logits.double(), -1)[ids[j]])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_perplexity_matches_hand_computation(family: str, tok: GPT2TokenizerFast) -> None:
    model = causal_lm(family, len(tok)).eval()
    ids = tok("\n\n".join(TEXTS))["input_ids"]
    n, w = len(ids), 8
    with torch.no_grad():
        # stride == window: disjoint windows, the first token of each unscored
        nll = [hand_nll(model, ids, (j // w) * w, j) for j in range(n) if j % w]
        assert perplexity(model, tok, TEXTS, window=w, stride=w, batch_size=2) == pytest.approx(
            math.exp(sum(nll) / len(nll)), rel=1e-9)
        # stride < window: token j >= w is scored in the window starting at ((j - w) // s + 1) * s
        s = 3
        nll = [hand_nll(model, ids, 0 if j < w else ((j - w) // s + 1) * s, j) for j in range(1, n)]
        assert perplexity(model, tok, TEXTS, window=w, stride=s, batch_size=3) == pytest.approx(
            math.exp(sum(nll) / len(nll)), rel=1e-9)
        # one window covering everything: stride is irrelevant
        full = float(nll_per_token(model, torch.tensor([ids])).mean())
        assert perplexity(model, tok, TEXTS, window=64, stride=5) == pytest.approx(math.exp(full), rel=1e-9)


def test_sliding_windows_cover_each_token_once() -> None:
    for n, w, s in [(10, 4, 4), (10, 4, 1), (17, 8, 3), (3, 8, 8)]:
        wins = sliding_windows(n, w, s)
        scored = [j for b, e, t in wins for j in range(e - t, e)]
        assert scored == list(range(n)) and all(e - b <= w for b, e, _ in wins)


def test_uniform_model_has_vocab_size_perplexity(tok: GPT2TokenizerFast) -> None:
    model = causal_lm("gpt2", len(tok))
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied LM head -> all logits 0
    assert perplexity(model, tok, TEXTS, window=16, stride=8) == pytest.approx(len(tok), rel=1e-9)


def test_training_lowers_perplexity_and_mode_is_restored(tok: GPT2TokenizerFast) -> None:
    corpus = make_synthetic_corpus(16, seed=0)
    model = causal_lm("gpt2", len(tok)).train()
    before = perplexity(model, tok, corpus.texts, window=32, stride=32)
    assert model.training
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in list(lm_loader(corpus, tok, 48, batch_size=8)) * 5:
        nll = nll_per_token(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        loss = nll.sum() / (batch["labels"][:, 1:] != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = perplexity(model, tok, corpus.texts, window=32, stride=32)
    assert not model.training
    assert after < 0.5 * before


def test_perplexity_rejects_bad_input(tok: GPT2TokenizerFast) -> None:
    model = causal_lm("gpt2", len(tok))
    with pytest.raises(ValueError, match="at least one text"):
        perplexity(model, tok, [])
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, TEXTS, window=8, stride=9)
