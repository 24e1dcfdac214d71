"""Speculative decoding's pure parts: the n-gram proposer and exact verification (greedy and rejection
sampling), the latter checked statistically: emitted tokens must follow the target distribution."""
from __future__ import annotations

import pytest
import torch

from tuili.spec import propose_ngram, verify_greedy, verify_sampled

# chi-square critical value, 5 degrees of freedom (6 tokens), significance 0.001: a correct sampler fails one
# run in a thousand; seeds are fixed, so a given run either always passes or always fails
CHI2_DF5_P001 = 20.515


def test_ngram_proposes_what_followed_the_latest_longest_match():
    assert propose_ngram([1, 2, 3, 4, 1, 2], k=3) == [3, 4, 1]
    assert propose_ngram([5, 1, 2, 9, 7, 1, 2, 8, 1, 2], k=2) == [8, 1]  # the most recent "1 2"
    # the 3-gram "7 1 2" beats the more recent 2-gram "1 2"
    assert propose_ngram([7, 1, 2, 4, 4, 1, 2, 5, 7, 1, 2], k=2, max_n=3) == [4, 4]
    assert propose_ngram([1, 2, 3], k=4) == []                             # no earlier occurrence
    assert propose_ngram([3, 3], k=4) == [3, 3, 3, 3]                      # a loop: continued periodically
    assert propose_ngram([1, 2, 3, 1, 2], k=5) == [3, 1, 2, 3, 1]
    assert propose_ngram([1, 2, 1, 2], k=2, min_n=3) == []                 # matches shorter than min_n ignored
    with pytest.raises(ValueError):
        propose_ngram([1, 2], k=0)


def test_greedy_accepts_the_matching_prefix():
    argmax = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [1, 2, 3, 4], [4, 4, 4, 4]])
    proposed = torch.tensor([[5, 6, 7], [5, 6, 7], [9, 2, 3], [4, 4, 0]])
    accepted, nxt = verify_greedy(argmax, proposed, torch.tensor([3, 3, 3, 2]))
    assert accepted.tolist() == [3, 1, 0, 2]          # the last: 2 real proposals, both match
    assert nxt.tolist() == [8, 9, 1, 4]


def _chi2(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft", ["model", "one-hot"])
def test_sampled_tokens_follow_the_target_distribution(draft):
    """A target p and a draft q that disagree, the same at every position (so the emitted tokens must be
    i.i.d. p): the first and the second emitted token pass a chi-square test against p, and the first
    proposal is accepted at the rate sum(min(p, q))."""
    torch.manual_seed(0)
    n, k, vocab = 40000, 3, 6
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.10, 0.20]) if draft == "model" else torch.eye(vocab)[2]
    proposed = torch.multinomial(q, n * k, replacement=True).view(n, k)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    accepted, nxt = verify_sampled(p.expand(n, k + 1, vocab), proposed, torch.full((n,), k),
                                   None if draft == "one-hot" else q.expand(n, k, vocab), gens)
    emitted = torch.cat((proposed, torch.zeros(n, 1, dtype=torch.long)), dim=1)
    emitted[torch.arange(n), accepted] = nxt                       # the tokens a sequence gains, position by position
    assert _chi2(emitted[:, 0], p) < CHI2_DF5_P001
    assert _chi2(emitted[accepted >= 1, 1], p) < CHI2_DF5_P001
    first_accept = (accepted >= 1).double().mean().item()
    assert first_accept == pytest.approx(torch.minimum(p, q).sum().item(), abs=0.01)


def test_sampled_edge_cases():
    vocab = 4
    p = torch.eye(vocab)[[1, 2, 3]][None]                         # the target is certain: 1, then 2, then 3
    accepted, nxt = verify_sampled(p, torch.tensor([[1, 2]]), torch.tensor([2]))
    assert (accepted.item(), nxt.item()) == (2, 3)                 # both accepted, the bonus from p[2]
    accepted, nxt = verify_sampled(p, torch.tensor([[0, 2]]), torch.tensor([2]))
    assert (accepted.item(), nxt.item()) == (0, 1)                 # p(0) = 0: rejected, redrawn from p[0]
    accepted, nxt = verify_sampled(p[:, :1], torch.empty(1, 0, dtype=torch.long), torch.tensor([0]))
    assert (accepted.item(), nxt.item()) == (0, 1)                 # nothing proposed: a plain sample
    seeded = [verify_sampled(torch.full((1, 3, 50), 0.02), torch.tensor([[3, 4]]), torch.tensor([2]),
                             generators=[torch.Generator().manual_seed(7)]) for _ in range(2)]
    assert [t.tolist() for t in seeded[0]] == [t.tolist() for t in seeded[1]]  # a seed fixes the outcome


def test_default_k_by_device():
    """k defaults to 4, and to 3 on the CPU (its packed kernels take rows four at a time); a set k is kept."""
    from tuili.config import EngineArgs

    assert EngineArgs(speculative_method="ngram", device="cuda").num_speculative_tokens == 4
    assert EngineArgs(speculative_method="ngram", device="cpu").num_speculative_tokens == 3
    assert EngineArgs(speculative_method="ngram", device="cpu", num_speculative_tokens=5).num_speculative_tokens == 5
