"""Where the quantizable layers of a causal LM are: architecture knowledge lives here only."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one input, and the op that produces it: AWQ folds 1/s into `prev` and s
    into the linears, so the unquantized block computes the same function."""

    prev: str  # an RMSNorm (its weight) or a linear (its output rows)
    linears: tuple[str, ...]
    watch: str  # the module whose output error the scale search minimises (it contains the linears)


LLAMA_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    # only without grouped-query attention:
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The foldable groups of one Llama-family decoder block; raises naming the linears it cannot map."""
    names = set(dict(block.named_modules()))
    groups = [g for g in LLAMA_SCALE_GROUPS if g.prev in names and all(n in names for n in g.linears)]
    groups = [g for g in groups if _foldable(block, g)]
    mapped = {n for g in groups for n in g.linears}
    unmapped = sorted(set(target_linears(block)) - mapped - {"self_attn.o_proj"})
    if unmapped:
        raise ValueError(f"AWQ does not know where to fold the scales of {', '.join(unmapped)} "
                         f"in {type(block).__name__}")
    return groups


def _foldable(block: nn.Module, group: ScaleGroup) -> bool:
    # v -> o folds only when v's outputs map one to one onto o's inputs (no grouped-query attention).
    prev = block.get_submodule(group.prev)
    width = block.get_submodule(group.linears[0]).in_features
    return not isinstance(prev, nn.Linear) or prev.out_features == width
