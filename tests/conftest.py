import os
import subprocess
import sys

# Triton kernels run in Triton's CPU interpreter here; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Converted models and other reusable work go to a folder of this test session, never the user's cache.
import tempfile  # noqa: E402

os.environ["QUANTBENCH_CACHE"] = tempfile.mkdtemp(prefix="quantbench-test-cache-")
from pathlib import Path

import pytest
import torch

from harness.models import build_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the random tiny Llama of harness/configs/model/tiny-llama.yaml, float32, eval mode."""
    model, tokenizer = build_tiny_llama({}, seed=0)
    return model.eval(), tokenizer


@pytest.fixture
def correlated_weights():
    torch.manual_seed(0)
    return torch.randn(48, 200) * torch.linspace(0.1, 3.0, 200)


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` in the repository root, as a user would type it."""
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


SWEEP_GRID = ["model=tiny-llama", "eval=quick", "quant=fp16,rtn", "quant.bits=8,3", "quant.group_size=-1,64"]


@pytest.fixture(scope="session")
def sweep(tmp_path_factory):
    """(out_dir, process) of a tiny sweep through the CLI: shared by the sweep, report and notebook tests."""
    out = tmp_path_factory.mktemp("sweep")
    proc = run_cli("sweep", *SWEEP_GRID, f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc
