import json

import pandas as pd
import pytest
from conftest import run_cli

GRID = ["model=tiny-llama", "eval=quick", "quant=fp16,rtn", "quant.bits=8,3", "quant.group_size=-1,64"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = run_cli("sweep", *GRID, f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_sweep_writes_consistent_records_tables_report_and_plots(sweep):
    out, proc = sweep
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    # 8 Hydra jobs; the baseline ignores bits and group size, so its 4 jobs are one point
    assert len(records) == 5 and all(r["status"] == "ok" for r in records)
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == 5 and len(pd.read_csv(out / "results.csv")) == 5
    for r in records:
        row = frame[frame["run_id"] == r["run_id"]].iloc[0]
        assert row["ppl/pydoc"] == pytest.approx(r["metrics"]["ppl/pydoc"])
        assert len(r["per_sample"]["nll/pydoc"]) == 2
        assert r["data"]["eval"]["pydoc"]["sha256"] and r["model"]["source_format"]
    quantized = frame[frame["method"] == "rtn"]
    assert (quantized["quantized_layer_bytes"] == quantized["quantized_layer_bytes_theoretical"]).all()
    assert (quantized["weight_bytes"] < frame[frame["method"] == "fp16"]["weight_bytes"].iloc[0]).all()
    assert (quantized["kl/pydoc"] > 0).all()
    w3 = quantized[quantized["bits"] == 3]["kl/pydoc"].min()
    assert w3 > quantized[quantized["bits"] == 8]["kl/pydoc"].max()
    report = (out / "report.md").read_text()
    assert "**Verdict:**" in report and report.count("| rtn ") == 4
    for png in ("ppl_vs_bits", "kl_vs_weight_bytes", "decode_vs_ppl"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
        assert f"plots/{png}.png" in report
    selection = json.loads((out / "selection.json").read_text())
    assert selection["baseline"] in set(frame["run_id"]) and len(selection["points"]) == 5


def test_sweep_resumes_without_redoing_points(sweep):
    out, _ = sweep
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    proc = run_cli("sweep", *GRID, f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already done" in proc.stdout + proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == before


def test_report_and_select_rebuild_from_records(sweep):
    out, _ = sweep
    (out / "report.md").unlink()
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").exists()
    strict = run_cli("select", str(out), "max_kl=0", "max_ppl_increase_pct=0")
    assert strict.returncode == 0, strict.stderr
    assert "fail: kl/pydoc" in strict.stdout and "Only the baseline passes" in strict.stdout
