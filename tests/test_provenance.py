"""Records say which code made them; resume redoes another version's points; damaged records are named."""

import json
import shutil

from conftest import SWEEP_GRID, run_cli
from test_select import POLICY, baseline, point, record

from harness import results
from harness.select import select


def copy_of(sweep, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(sweep[0], out)
    return out


def test_records_carry_the_code_version_and_resume_redoes_only_another_versions_points(sweep, tmp_path):
    out = copy_of(sweep, tmp_path)
    paths = sorted((out / "runs").glob("*.json"))
    recs = [json.loads(p.read_text()) for p in paths]
    assert all(r["env"]["code_version"] == results.code_version() and r["env"]["lm_eval"] for r in recs)
    stale = next(p for p, r in zip(paths, recs, strict=True) if r["quant"]["method"] == "rtn")
    edited = json.loads(stale.read_text())
    edited["env"]["code_version"] = "0.0.1+gdeadbeef"
    stale.write_text(json.dumps(edited))
    proc = run_cli("sweep", *SWEEP_GRID, f"out_dir={out}", "resume=any")
    assert proc.returncode == 0 and "measuring it again" not in proc.stdout + proc.stderr
    report = (out / "report.md").read_text()
    assert "Mixed code versions" in report and "0.0.1+gdeadbeef" in report
    proc = run_cli("sweep", *SWEEP_GRID, f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (proc.stdout + proc.stderr).count("measuring it again") == 1
    assert json.loads(stale.read_text())["env"]["code_version"] == results.code_version()
    assert "Mixed code versions" not in (out / "report.md").read_text()


def test_damaged_records_are_named_by_report_and_select(sweep, tmp_path):
    out = copy_of(sweep, tmp_path)
    paths = sorted((out / "runs").glob("*.json"))
    half = paths[1].read_text()
    paths[1].write_text(half[: len(half) // 2])
    paths[2].write_text(json.dumps({"hello": "world"}))
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "## Unusable records" in report
    assert f"{paths[1].name}: not valid JSON" in report and f"{paths[2].name}: not a run record" in report
    proc = run_cli("select", str(out))
    assert f"warning: unusable record runs/{paths[1].name}: not valid JSON" in proc.stderr


def test_a_missing_kl_fails_its_check_instead_of_counting_as_zero():
    no_kl = record("w4", nbytes=250)
    del no_kl["per_sample"]["kl/pydoc"]
    s = select([baseline(), no_kl, record("w8", bits=8, nbytes=500)], POLICY)
    assert s["chosen"] == "w8" and "kl/pydoc not measured for this point" in point(s, "w4")["reasons"]


def test_a_point_of_another_dtype_or_device_is_not_paired_with_the_baseline():
    base, other = baseline(), record("w4", nbytes=250)
    base["model"], other["model"] = {"name": "m", "dtype": "torch.bfloat16"}, {"name": "m", "dtype": "torch.float32"}
    s = select([base, other], POLICY)
    assert s["chosen"] is None and "dtype 'torch.float32' ≠ baseline's 'torch.bfloat16'" in point(s, "w4")["reasons"][0]
