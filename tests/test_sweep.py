import json

import pandas as pd
import pytest
from conftest import SWEEP_GRID as GRID
from conftest import run_cli


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
    assert report.index("**Verdict:**") < report.index("## What it means") < report.index("## Results")
    assert report.split("## Results")[1].count("| rtn ") == 4 and "| 70B |" in report and "drop qb_arithmetic" in report
    # no CPU kernel serves these formats: their speed is not measured, and the report says why
    assert quantized["decode_tok_s"].isna().all() and quantized["speed_note"].str.startswith("no cpu kernel").all()
    note = next(line for line in report.splitlines() if line.startswith('Speed ("no kernel here"): no cpu kernel'))
    assert all(label in note for label in ("rtn 8-bit per-channel", "rtn 3-bit g64")) and "no kernel here |" in report
    assert not (out / "plots" / "quality_vs_decode.png").exists()  # nothing to plot against
    for png in ("pareto_quality_vs_bits", "task_deltas"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
        assert f"plots/{png}.png" in report
    page = (out / "report.html").read_text()  # self-contained: every plot embedded, no file links
    assert page.count("data:image/png;base64,") == 2 and "plots/" not in page and "<strong>Verdict:</strong>" in page
    selection = json.loads((out / "selection.json").read_text())
    assert selection["baseline"] in set(frame["run_id"]) and len(selection["points"]) == 5
    assert selection["tasks"] == ["qb_arithmetic"] and selection["corpora"] == ["pydoc"]


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
    assert "- kl/pydoc bound" in strict.stdout and "No quantized point passes the bar" in strict.stdout
    assert "Closest: " in strict.stdout and "FAIL" in strict.stdout
    chosen = json.loads((out / "selection.json").read_text())
    assert chosen["chosen"] is None and chosen["closest"] in {p["run_id"] for p in chosen["points"]}
    unknown = run_cli("select", str(out), "tasks=[hellaswag]")
    assert unknown.returncode == 2 and "it measured: qb_arithmetic" in unknown.stderr


def test_a_parallel_launcher_writes_the_same_records_into_one_folder(sweep, tmp_path):
    """Hydra's joblib launcher, two workers: the same points and measurements (timings aside) as the sequential
    sweep, the baseline reference made once, one report."""
    proc = run_cli("sweep", *GRID, "hydra/launcher=parallel", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib" in proc.stdout + proc.stderr

    def measured(folder):
        out = {}
        for p in (folder / "runs").glob("*.json"):
            r = json.loads(p.read_text())
            out[r["run_id"]] = {k: v for k, v in r["metrics"].items()
                                if k.startswith(("ppl/", "kl/", "top1/", "task/", "bits_per")) and "_s" not in k}
        return out

    assert measured(tmp_path) == measured(sweep[0])
    assert len(list((tmp_path / "baseline").glob("*.pt"))) == 1 and not list((tmp_path / "runs").glob("*.lock"))
    assert (tmp_path / "report.md").exists()


def test_the_slurm_launcher_composes_and_runs_through_submitits_local_executor(tmp_path):
    shown = run_cli("run", "hydra/launcher=slurm", "--cfg", "hydra")
    assert shown.returncode == 0 and "SlurmLauncher" in shown.stdout and "gpus_per_node: 1" in shown.stdout
    proc = run_cli("sweep", "model=tiny-llama", "eval=quick", "quant=fp16,rtn", "quant.bits=8", "quant.group_size=-1",
                   "hydra/launcher=slurm_local", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records) and (tmp_path / "report.md").exists()
