"""Offline CLIP tokenizer matching ``openai/clip-vit-large-patch14`` as the reference used it.

The reference called ``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")`` under
transformers 4.19 (the pure-Python tokenizer) with ``ftfy`` installed, which runs
``ftfy.fix_text`` on the prompt before lower-casing it. transformers 5's ``CLIPTokenizer`` is
backed by the ``tokenizers`` library and never calls ftfy, so ``tokenize`` applies
``ftfy.fix_text`` itself (without it, curly quotes, ligatures, full-width characters, HTML
entities and mojibake would tokenize differently).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ftfy
import torch
from transformers import CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
PAD_ID = EOS_ID
MAX_LENGTH = 77
_SPECIAL_RE = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")


def _missing_files_message(directory: Path, missing: list[str]) -> str:
    return (
        f"CLIP tokenizer files {missing} not found in {directory}. They are generated offline by "
        "`python -m tools.make_clip_tokenizer_files <open_clip_torch wheel>` "
        "(see ldm/modules/encoders/clip_tokenizer/README.md)."
    )


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split(" ")) for line in lines if line]  # type: ignore[misc]


def load_clip_tokenizer(directory: str | Path = TOKENIZER_DIR) -> CLIPTokenizer:
    """Load the CLIP ViT-L/14 BPE tokenizer from the package-local vocab/merges files.

    Never touches the network. Raises ``FileNotFoundError`` if a file is missing.
    """
    directory = Path(directory)
    missing = [name for name in (VOCAB_FILE, MERGES_FILE) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(_missing_files_message(directory, missing))
    vocab = json.loads((directory / VOCAB_FILE).read_text(encoding="utf-8"))
    merges = _read_merges(directory / MERGES_FILE)
    # transformers 5: pass `vocab`/`merges`; `vocab_file=`/`merges_file=` are silently ignored
    # by the constructor and yield a 2-token vocabulary.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    if len(tokenizer) != VOCAB_SIZE or tokenizer.bos_token_id != BOS_ID or tokenizer.pad_token_id != PAD_ID:
        raise ValueError(f"unexpected CLIP tokenizer built from {directory} ({len(tokenizer)} tokens)")
    return tokenizer


def clean_text(text: str) -> str:
    """Apply ``ftfy.fix_text`` as the reference tokenizer did.

    Like the reference, special-token strings are split out first and left untouched.
    """
    parts = _SPECIAL_RE.split(text)
    return "".join(part if _SPECIAL_RE.fullmatch(part) else ftfy.fix_text(part) for part in parts)


def count_tokens(tokenizer: CLIPTokenizer, text: str) -> int:
    """Tokens ``text`` takes before any cut, BOS and EOS included (as :func:`tokenize` cleans and splits it):
    above ``max_length`` the encoder reads only the first ``max_length``."""
    return len(tokenizer(clean_text(text), verbose=False)["input_ids"])  # verbose: no length warning


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], max_length: int = MAX_LENGTH) -> torch.LongTensor:
    """Tokenize prompts to a ``[B, max_length]`` LongTensor.

    Adds BOS/EOS, truncates (EOS kept last) and pads with ``<|endoftext|>``, exactly as the
    reference ``FrozenCLIPEmbedder`` did.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a str")
    if not prompts:
        return torch.empty((0, max_length), dtype=torch.long)
    cleaned = [clean_text(p) for p in prompts]
    encoding = tokenizer(
        cleaned,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return encoding["input_ids"].long()
