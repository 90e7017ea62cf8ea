"""Captions for attention control: tokenised by the checkpoint's own CLIP so words and token positions line up
with what the model reads (Prompt-to-Prompt aligns words; Plug-and-Play encodes its source pass's caption)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..psedit_core.p2p import word_positions
from . import _comfy


@dataclass(frozen=True)
class Caption:
    """A caption as the CLIP tokenises it: its words, each word's tokens, and the full token sequence of one
    77-token window (start token, the words' tokens, end token; no padding)."""

    text: str
    words: tuple[str, ...]
    word_tokens: tuple[tuple, ...]
    tokens: tuple
    length: int

    def positions(self, wanted: list[str]) -> list[int]:
        """Token positions of the words in ``wanted`` (case-insensitive, surrounding punctuation ignored)."""
        keys = {_word_key(w) for w in wanted}
        spans = word_positions(self.word_tokens)
        return [p for w, span in zip(self.words, spans, strict=True) if _word_key(w) in keys for p in span]


def _word_key(word: str) -> str:
    return word.strip().strip(".,;:!?\"'()[]").lower()


def _hashable(token):
    if isinstance(token, int):
        return token
    t = torch.as_tensor(token)  # a textual-inversion embedding
    return ("embedding", tuple(t.shape), round(float(t.float().sum()), 4))


def _token_key(tokens: dict) -> str:
    return "l" if "l" in tokens else sorted(tokens)[0]


def _real(window: list) -> list:
    return [t for t in window if len(t) > 2 and t[2] != 0]


def tokenize_caption(clip, text: str, name: str) -> Caption:
    """Tokenise ``text`` with the CLIP's own tokenizer and split its tokens into words (each word tokenised alone,
    the way CLIP's BPE treats it inside the caption). SDXL's two tokenizers must agree on the positions."""
    if not text.strip():
        raise ValueError(f"{name} is empty: write what the photo shows / should show")
    full = clip.tokenize(text, return_word_ids=True)
    key = _token_key(full)
    windows = full[key]
    if len(windows) != 1:
        raise ValueError(f"{name} is longer than one 77-token window ({len(windows)} windows): shorten it, word "
                         "alignment works on one window")
    lengths = {k: len(_real(v[0])) for k, v in full.items() if v}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{name}: this CLIP's tokenizers disagree on the token positions ({lengths}): attention "
                         "control needs one token layout")
    window = windows[0]
    real = _real(window)
    first = next(i for i, t in enumerate(window) if len(t) > 2 and t[2] != 0) if real else 1
    words = tuple(text.split())
    word_tokens = []
    for w in words:
        part = _real(clip.tokenize(w, return_word_ids=True)[key][0])
        word_tokens.append(tuple(_hashable(t[0]) for t in part))
    joined = [t for w in word_tokens for t in w]
    if joined != [_hashable(t[0]) for t in real] or first != 1:
        raise ValueError(f"{name}: its tokens could not be split into its words (weights or embeddings across word "
                         "boundaries?): write the caption as plain words")
    tokens = (_hashable(window[0][0]), *joined, _hashable(window[len(real) + 1][0]))
    return Caption(text, words, tuple(word_tokens), tokens, len(window))


def indicator(length: int, positions: list[int]) -> torch.Tensor:
    """1 at ``positions``, 0 elsewhere: the tokens whose maps a local blend sums."""
    w = torch.zeros(length)
    w[positions] = 1.0
    return w


def split_words(text: str) -> list[str]:
    """Words of a comma- or space-separated list."""
    return text.replace(",", " ").split()


def encode(clip, text: str):
    """CONDITIONING as the stock CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def check_clip(model, cond, name: str) -> None:
    want = _comfy.context_dim(model)
    width = cond[0][0].shape[-1]
    if want is not None and width != want:
        raise ValueError(
            f"clip: it encodes the {name} at width {width} but this {_comfy.model_family(model)} MODEL reads text of "
            f"width {want}: connect the CLIP of the same checkpoint as the MODEL"
        )
    _comfy.check_conditioning(model, cond, name)
