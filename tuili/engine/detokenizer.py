"""Incremental detokenization and stop-string detection."""
from __future__ import annotations

from tuili.engine.sequence import Sequence


class Detokenizer:
    """Turns each new token into new text without re-decoding the whole output every step.

    Decodes a short window before the new tokens and takes the difference, so that tokenizers whose pieces
    depend on the previous token (SentencePiece spaces, byte-level UTF-8 split over tokens) come out right;
    text ending in an incomplete UTF-8 character is held back until the character is complete.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode_new_tokens(self, seq: Sequence) -> str:
        """Append the text of `seq`'s newest tokens to `seq.output_text`; return that new text."""
        skip = seq.params.skip_special_tokens
        tokens = seq.token_ids
        prefix = self.tokenizer.decode(tokens[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(tokens[seq.prefix_offset:], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(tokens)
        seq.output_text += delta
        return delta


def find_stop_string(seq: Sequence, new_text_len: int) -> str | None:
    """If a stop string now appears in `seq.output_text`, cut the text there and return the stop string.

    Only the region that the newest `new_text_len` characters can complete is searched.
    """
    text = seq.output_text
    best: tuple[int, str] | None = None
    for stop in seq.params.stop:
        start = max(0, len(text) - new_text_len - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    if best is None:
        return None
    idx, stop = best
    seq.output_text = text[: idx + len(stop)] if seq.params.include_stop_str_in_output else text[:idx]
    return stop
