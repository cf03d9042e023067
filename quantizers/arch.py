"""Where the quantizable layers of a causal LM are: architecture knowledge lives here only."""

from __future__ import annotations

from torch import nn


def target_linears(model: nn.Module, quantize_lm_head: bool = False) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model, by qualified name; the output head only when asked."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (quantize_lm_head or module is not head)
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


KNOWN_DECODERS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM, in order."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"block-by-block calibration does not know {type(model).__name__}: it expects model.model.layers "
            f"as in {', '.join(KNOWN_DECODERS)}"
        )
    return layers
