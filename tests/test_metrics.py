import copy
import math

import pytest
import torch

from harness.metrics import divergence, perplexity


@pytest.fixture
def windows():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 257, (3, 48), generator=gen)


def test_perplexity_equals_a_hand_computation(tiny, windows):
    model, _ = tiny
    result = perplexity.perplexity(model, windows)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0].double()
            for t in range(len(w) - 1):
                p = torch.softmax(logits[t], dim=-1)[w[t + 1]]
                nll_sum -= math.log(p.item())
                count += 1
    assert result.tokens == count
    assert result.ppl == pytest.approx(math.exp(nll_sum / count), rel=1e-5)
    assert len(result.nll_per_window) == 3


def test_perplexity_matches_transformers_loss(tiny, windows):
    model, _ = tiny
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert perplexity.perplexity(model, windows).nll_per_window == pytest.approx(losses, rel=1e-5)


def test_kl_of_a_model_against_itself_is_zero(tiny, windows):
    model, _ = tiny
    with torch.no_grad():
        logits = model(windows[:1]).logits[0]
    ref = divergence.topk_reference(logits, 16)
    assert divergence.token_kl(logits, ref).abs().max() < 1e-5
    assert divergence.top1_agreement(logits, ref).all()


def test_topk_kl_is_a_lower_bound_that_is_exact_at_full_vocabulary(tiny, windows):
    model, _ = tiny
    other = copy.deepcopy(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        base, quant = model(windows[:1]).logits[0], other(windows[:1]).logits[0]
    exact = divergence.exact_kl(base, quant)
    assert exact.mean() > 1e-3
    coarse = divergence.token_kl(quant, divergence.topk_reference(base, 8))
    assert (coarse <= exact + 1e-5).all()
    full = divergence.token_kl(quant, divergence.topk_reference(base, base.shape[-1]))
    torch.testing.assert_close(full, exact, rtol=1e-3, atol=1e-4)  # float32 tail-mass rounding
    assert divergence.top1_agreement(quant, divergence.topk_reference(base, 1)).float().mean() < 1
