import pytest
from conftest import run_cli

QUICK = ["model=tiny-llama", "eval=quick"]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["model=nope"], "model/nope"),
        (["quant=nope"], "quant/nope"),
        (["quant.nope=1"], "nope"),
        (["quant=rtn", "quant.bits=9"], "quant.bits=9 is not supported: use an integer from 2 to 8"),
        (["quant=gptq", "quant.bits=9"], "quant.bits=9 is not supported: use an integer from 2 to 8"),
        (["quant=gptq", "quant.percdamp=2"], "quant.percdamp=2 must be in [0, 1)"),
        (["quant=rtn", "quant.bits=1"], "from 2 to 8"),
        (["quant=rtn", "quant.group_size=0"], "quant.group_size=0 is not valid"),
        (["quant=rtn", "quant.group_size=-2"], "quant.group_size=-2 is not valid"),
        (["eval.corpora=[nope]"], "unknown corpus 'nope'"),
        (["dtype=float64"], "dtype='float64' is not known"),
    ],
)
def test_bad_config_exits_non_zero_with_a_clear_line(tmp_path, overrides, expected):
    proc = run_cli("run", *QUICK, *overrides, f"out_dir={tmp_path}")
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("runs/*.json"))


def test_missing_model_path(tmp_path):
    proc = run_cli("run", "eval=quick", "model=hf", f"model.name={tmp_path}/missing.gguf", f"out_dir={tmp_path}")
    assert proc.returncode == 2
    assert "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_unreadable_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    proc = run_cli("run", "eval=quick", "model=hf", f"model.name={bad}", f"out_dir={tmp_path}")
    assert proc.returncode == 2
    assert "is not a readable GGUF file" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_command_and_missing_folder(tmp_path):
    assert "unknown command 'nope'" in run_cli("nope").stderr
    proc = run_cli("report", str(tmp_path))
    assert proc.returncode == 2 and "holds no run records" in proc.stderr


def test_calibration_text_shorter_than_one_sample(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("alpha beta\n\ngamma delta\n\nepsilon\n\nzeta eta\n")
    proc = run_cli("run", *QUICK, "quant=gptq", f"calib.corpus={small}", f"out_dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fewer than one sample of calib.seqlen=2048: lower calib.seqlen" in proc.stderr
    assert not list(tmp_path.glob("runs/*.json"))
