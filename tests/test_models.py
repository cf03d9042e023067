"""Model loading: each point gets its own copy on its device; the pristine model stays where it was."""

import torch


def test_a_points_model_is_copied_tensor_by_tensor_keeping_tied_weights(tiny):
    from harness.models import _copy_to, build_tiny_llama

    model, _ = build_tiny_llama({"tie_word_embeddings": True}, seed=0)
    on_meta = _copy_to(model, torch.device("meta"))  # stands in for the GPU: the pristine stays where it is
    assert on_meta.lm_head.weight is on_meta.model.embed_tokens.weight and on_meta.lm_head.weight.is_meta
    assert not model.lm_head.weight.is_meta
    again = _copy_to(model, torch.device("cpu"))
    ids = torch.randint(0, 256, (1, 12))
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert again.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()


def test_a_model_of_a_known_shape_is_built_with_random_weights_and_said_to_be_so():
    import pytest

    from harness.errors import UserError
    from harness.models import load_model, resolve_source

    with pytest.raises(UserError, match="not a known shape: use one of llama3-8b"):
        resolve_source({"name": "gpt5", "source": "shape"})
    loaded = load_model({"name": "smollm2-135m", "source": "shape"}, torch.bfloat16, "cpu")
    assert 130e6 < loaded.info["params"] < 140e6 and loaded.info["source_format"].startswith("random init")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
