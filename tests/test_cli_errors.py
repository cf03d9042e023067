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
        (["eval.tasks=[qb_arithmetik]"], "'qb_arithmetik' is not a task lm-eval knows; closest: qb_arithmetic"),
        (["eval.task_limit=0"], "eval.task_limit=0 must be a positive integer"),
        (["quant=rtn", "quant.backend=marlin"], "quant.backend='marlin' is not known"),
        (["quant=rtn", "quant.bits=3", "quant.backend=cpu_int4"],
         "it serves 4-bit weights only, not 3-bit; backends that can: torch"),
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


def test_bench_on_the_cpu_writes_its_tables_and_checks_every_backend(tmp_path):
    import pandas as pd

    proc = run_cli("bench", "shapes=[smollm2-135m]", "formats=[w4g64,w3g64]", "backends=[torch,cpu_int4,triton]",
                   "prefill_tokens=16", "repeats=2", "decode_model=null", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    layers = pd.read_csv(tmp_path / "layers.csv").set_index(["format", "backend"])
    assert layers.loc[("w4g64", "cpu_int4"), "status"] == "ok"
    assert layers.loc[("w3g64", "cpu_int4"), "status"].startswith("n/a: it serves 4-bit weights only")
    assert layers.loc[("w4g64", "triton"), "status"] == "n/a: it runs on CUDA only"
    measured = layers[layers["status"] == "ok"]
    assert len(measured) == 4  # bf16 and torch at two formats, cpu_int4 at one
    assert (measured["max_rel_error"] < 0.02).all()
    assert (measured["bytes_over_theoretical"].abs() < 0.01).all()  # packed storage is what the format needs
    assert (tmp_path / "bench.md").exists() and (tmp_path / "bench.png").exists()


def test_bench_bad_format_says_the_form(tmp_path):
    proc = run_cli("bench", "formats=[int4]", "decode_model=null", f"out_dir={tmp_path}")
    assert proc.returncode == 2 and "w<bits>g<group size>" in proc.stderr and "Traceback" not in proc.stderr
