"""Prompt-lookup (n-gram) proposer: no second model. If the last n tokens occurred earlier in the sequence
(prompt or output), propose the k tokens that followed their most recent earlier occurrence; try the longest
n first (max_n down to min_n). Repetitive text (code, quoting the prompt, lists) makes it accept often.

When the match is so recent that fewer than k tokens follow it, the text since the match is taken to repeat
(a loop "a b c a b" continues "c a b c ..."): k proposals whenever there is a match, which keeps
verification steps the same shape (one CUDA graph) and is exactly right for loops."""
from __future__ import annotations


def propose_ngram(token_ids: list[int], k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Up to k proposed next tokens (fewer near the end of the matched text; none without a match)."""
    if k < 1 or not 1 <= min_n <= max_n:
        raise ValueError(f"need k >= 1 and 1 <= min_n <= max_n, got k={k}, min_n={min_n}, max_n={max_n}")
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = token_ids[length - n:]
        first = suffix[0]
        # the most recent earlier occurrence: start positions j < length - n, scanned from the end
        for j in range(length - n - 1, -1, -1):
            if token_ids[j] == first and token_ids[j:j + n] == suffix:
                following = token_ids[j + n:j + n + k]
                period = length - n - j
                while len(following) < k:
                    following.append(following[len(following) - period])
                return following
    return []


class NgramProposer:
    """Proposes for a batch of scheduled sequences from each one's own tokens (on the host, no model)."""

    def __init__(self, max_n: int = 4, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n

    def propose(self, items) -> None:
        for item in items:
            item.set_drafts(propose_ngram(item.seq.token_ids, item.num_lookahead, self.max_n, self.min_n))
