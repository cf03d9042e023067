"""KL divergence and top-1 agreement against the baseline, from a bounded top-k reference.

The baseline keeps, for each token, its k most likely next tokens and their log-probs.
KL(P_base || Q) is then computed over k + 1 outcomes: those k tokens and "any other
token" (the tail). Merging outcomes never raises KL, so this is a lower bound of the
exact KL that tightens as the tail mass shrinks, and equals it when k is the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TopKReference:
    logprobs: Tensor  # (tokens, k) float32, descending
    ids: Tensor  # (tokens, k) int64

    def slice(self, start: int, stop: int) -> TopKReference:
        return TopKReference(self.logprobs[start:stop], self.ids[start:stop])


def topk_reference(logits: Tensor, k: int) -> TopKReference:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return TopKReference(top.values.cpu(), top.indices.cpu())


def _tail_logmass(top_logprobs: Tensor) -> Tensor:
    # log(1 - sum p_topk), safe where the top-k hold (almost) all the mass.
    return torch.log((-torch.expm1(torch.logsumexp(top_logprobs, dim=-1))).clamp(min=1e-12))


def token_kl(logits: Tensor, ref: TopKReference) -> Tensor:
    """Per-token KL(P_ref || Q) over the reference's top-k tokens plus the tail."""
    q = torch.log_softmax(logits.float(), dim=-1).gather(-1, ref.ids.to(logits.device)).cpu()
    p = ref.logprobs
    kl_top = (p.exp() * (p - q)).sum(dim=-1)
    p_tail, q_tail = _tail_logmass(p), _tail_logmass(q)
    kl_tail = torch.xlogy(p_tail.exp(), p_tail.exp()) - p_tail.exp() * q_tail
    return (kl_top + kl_tail).clamp(min=0)


def top1_agreement(logits: Tensor, ref: TopKReference) -> Tensor:
    """Whether the model's most likely token is the baseline's, per token."""
    return logits.argmax(dim=-1).cpu() == ref.ids[:, 0]


def exact_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Exact per-token KL(P || Q) over the full vocabulary (for checks on small vocabularies)."""
    p = torch.log_softmax(logits_p.float(), dim=-1)
    q = torch.log_softmax(logits_q.float(), dim=-1)
    return (p.exp() * (p - q)).sum(dim=-1)
