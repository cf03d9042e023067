"""The static-cache decoder computes what the model's own forward computes."""

import copy

import pytest
import torch

import quantizers
from harness.metrics.speed import decode_tok_s
from quantizers import QuantSpec
from quantizers.kernels.decode import StaticDecoder


def greedy_with_full_forwards(model, prompt, n):
    ids = prompt[None]
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.numel():]


@pytest.mark.parametrize("quantized,compiled", [(False, False), (True, False), (False, True), (True, True)])
def test_decoder_logits_match_the_models_forward(tiny, quantized, compiled):
    # q/k/v and gate/up run fused (the default); compiled: norms, rotary + cache writes and activation through
    # torch.compile
    model, _ = tiny
    if quantized:  # QuantLinear layers run through the decoder too
        model = quantizers.quantize(copy.deepcopy(model), QuantSpec("rtn", 4, 32))
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits[0]
    decoder = StaticDecoder(copy.deepcopy(model), max_len=40, compile=compiled)
    assert all(fused is not None for fused in decoder.qkv + decoder.gate_up)
    decoder.prefill(ids[0, :20])
    for t in range(20, 30):  # teacher-forced steps through the cache, one token at a time
        logits = decoder.forward(ids[:, t:t + 1], torch.tensor([t]))
        torch.testing.assert_close(logits[0], expected[t], rtol=1e-4, atol=1e-4)
    assert decoder.glue.fell_back == []


def test_decoder_greedy_tokens_match_and_it_reports_a_rate():
    from harness.models import build_tiny_llama

    # larger random weights than the default, so greedy decoding does not repeat one token
    model = build_tiny_llama({"initializer_range": 0.2}, seed=0)[0].eval()
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(1))
    decoder = StaticDecoder(model, max_len=40)
    decoder.prefill(prompt)
    tokens = decoder.decode(15)
    assert tokens.tolist() == greedy_with_full_forwards(model, prompt, 15).tolist()
    assert len(set(tokens.tolist())) > 1
    assert decode_tok_s(model, prompt, 8, repeats=1, warmup=0) > 0


def test_decoder_refuses_more_tokens_than_its_cache(tiny):
    decoder = StaticDecoder(tiny[0], max_len=16)
    with pytest.raises(ValueError, match="no room"):
        decoder.prefill(torch.zeros(16, dtype=torch.long))
    decoder.prefill(torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="do not fit"):
        decoder.decode(7)


def test_the_prefill_that_gpu_timing_captures_gives_the_forwards_next_token_on_every_replay():
    from harness.metrics.speed import prefill_step
    from harness.models import build_tiny_llama

    model = build_tiny_llama({"initializer_range": 0.2}, seed=0)[0].eval()
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(2))
    step = prefill_step(model, prompt)
    expected = greedy_with_full_forwards(model, prompt, 1)
    assert [step().reshape(-1).tolist() for _ in range(3)] == [expected.tolist()] * 3  # replays are idempotent
