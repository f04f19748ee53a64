"""Tokenised text-classification data served as logical batches from a batch sampler.

The training loader yields *logical* batches (Poisson for DP, shuffled fixed-size otherwise);
the method cuts each into physical micro-batches by length (:mod:`dpbench.data.batching`). Examples
are tokenised once up front and padded per batch to the longest sequence in it; evaluation batches
group the dev set by length, so they carry little padding too.
"""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from dpbench.data.batching import eval_batches
from dpbench.data.examples import TextClassificationData


class EncodedDataset(Dataset):
    """Token ids (unpadded) and labels of a :class:`TextClassificationData`."""

    def __init__(self, data: TextClassificationData, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        enc = tokenizer(data.text_a, data.text_b, truncation=True, max_length=max_length)
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in enc["input_ids"]]
        types = enc.get("token_type_ids")
        self.token_type_ids = None if types is None else [torch.tensor(t, dtype=torch.long) for t in types]
        self.labels = list(data.labels)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "label": self.labels[i]}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[i]
        return item


class Collator:
    """Right-pads a list of items to the longest one; an empty list gives a (0, 1) batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict]) -> dict[str, Tensor]:
        if not items:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty, "token_type_ids": empty,
                    "labels": torch.zeros(0, dtype=torch.long)}
        rows = [torch.as_tensor(it["input_ids"], dtype=torch.long) for it in items]
        ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id)
        mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        if "token_type_ids" in items[0]:
            types = pad_sequence([torch.as_tensor(it["token_type_ids"], dtype=torch.long) for it in items],
                                 batch_first=True)
        else:
            types = torch.zeros_like(ids)
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


class TextDataModule(L.LightningDataModule):
    """Train loader driven by ``train_sampler`` (logical batches); dev loader in fixed order."""

    def __init__(self, train: TextClassificationData, dev: TextClassificationData,
                 tokenizer: PreTrainedTokenizerBase, max_length: int, train_sampler: Sampler[list[int]],
                 eval_batch_size: int = 64) -> None:
        super().__init__()
        self.train_set = EncodedDataset(train, tokenizer, max_length)
        self.dev_set = EncodedDataset(dev, tokenizer, max_length)
        self.collate = Collator(tokenizer.pad_token_id)
        self.train_sampler = train_sampler
        self.eval_batch_size = eval_batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_sampler=self.train_sampler, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dev_set, batch_sampler=eval_batches(self.dev_set.lengths, self.eval_batch_size),
                          collate_fn=self.collate)

    def state_dict(self) -> dict:
        return {"sampler": self.train_sampler.state_dict()} if hasattr(self.train_sampler, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if "sampler" in state:
            self.train_sampler.load_state_dict(state["sampler"])
