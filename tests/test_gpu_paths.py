"""Decisions that only run on a GPU, driven on the CPU with a CUDA device faked: CI has no GPU, and the
sweep's backend selection once failed every quantized point there (it read packed storage that does not
exist before quantization)."""

import collections

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import quantizers
from harness import CONFIG_DIR
from harness.errors import UserError
from harness.models import build_tiny_llama
from harness.sweep import make_point, plan_backends

SHAPES = {  # the GPU smoke's two models: kernel-friendly widths, and SmolLM2's 576-wide ragged shape
    "512": {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 2},
    "576": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3},
}


@pytest.fixture
def fake_h100(monkeypatch):
    """torch as it answers on an H100: CUDA available, sm_90. Nothing is ever put on the device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="sweep", overrides=["model=tiny-llama", "eval=quick", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits,group_size", [(8, 128), (4, 128), (4, -1), (3, 128), (3, -1), (4, 64), (3, 64)])
def test_the_sweeps_plan_on_cuda_comes_from_the_format_and_holds_after_quantization(fake_h100, shape, bits,
                                                                                    group_size):
    point = make_point(config("quant=rtn", f"quant.bits={bits}", f"quant.group_size={group_size}"))
    assert point.device == "cuda" and point.backend == "auto"
    model, _ = build_tiny_llama(SHAPES[shape], seed=0)
    planned = plan_backends(point, model)  # before quantization: no packed storage exists yet
    assert set(planned.values()) <= {"cuda", "triton"} and "cuda" in planned.values()
    quantizers.quantize(model, point.spec, None)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, quantizers.QuantLinear)}
    after = quantizers.check_backend("auto", {n: (m.format, torch.device("cuda")) for n, m in packed.items()})
    assert after == planned


def test_a_backend_that_cannot_serve_is_refused_before_any_work_naming_the_layer(fake_h100):
    point = make_point(config("quant=rtn", "quant.bits=3", "quant.group_size=128", "quant.backend=tinygemm"))
    model, _ = build_tiny_llama(SHAPES["576"], seed=0)
    with pytest.raises(UserError, match=r"cannot serve model\.layers\.0\.self_attn\.q_proj \(3-bit, group 128, "
                                        r"576 wide, on cuda\).*backends that can: torch, cuda, triton"):
        plan_backends(point, model)


def test_quant_backend_can_be_set_sweep_wide_and_the_baseline_ignores_it():
    baseline = make_point(config("quant=fp16", "quant.backend=triton", "device=cpu"))
    rtn = make_point(config("quant=rtn", "quant.backend=triton", "device=cpu"))
    assert baseline.backend == "auto" and rtn.backend == "triton"
    assert baseline.identity == make_point(config("quant=fp16", "device=cpu")).identity  # one baseline point


def test_speed_is_measured_wherever_a_gpu_kernel_serves_and_not_on_the_reference(fake_h100):
    from harness.sweep import no_kernel_note

    point = make_point(config("quant=rtn", "quant.bits=3", "quant.group_size=64"))
    model, _ = build_tiny_llama(SHAPES["576"], seed=0)
    assert no_kernel_note(point, dict(collections.Counter(plan_backends(point, model).values()))) is None
    cpu = make_point(config("quant=rtn", "quant.bits=3", "quant.group_size=64", "device=cpu"))
    assert no_kernel_note(cpu, {"torch": 14}).startswith("no cpu kernel for rtn-w3g64")
    named = make_point(config("quant=rtn", "quant.bits=3", "quant.backend=torch", "device=cpu"))
    assert no_kernel_note(named, {"torch": 14}) is None  # the user asked for the reference: it is timed


def test_parallel_points_on_a_machine_with_several_gpus_take_one_gpu_each(tmp_path, monkeypatch):
    from harness.sweep import gpu_slot

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    (tmp_path / "runs").mkdir()
    with gpu_slot(tmp_path, "cuda") as first, gpu_slot(tmp_path, "cuda") as second:
        assert {first, second} == {0, 1} and chosen == [first, second]
    with gpu_slot(tmp_path, "cuda") as again:  # both free again
        assert again == 0
    with gpu_slot(tmp_path, "cpu") as none:
        assert none is None
