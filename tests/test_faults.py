"""Faults and bad input: each fails where it should, says so in one line, and loses nothing else."""

import json
import os
import socket
import stat

import pytest
from conftest import run_cli

TINY = ["model=tiny-llama", "eval=quick"]


@pytest.mark.parametrize("overrides, message", [
    (["quant=fp16,rtn", "quant.bits=8,9,4"], "quant.bits=9 is not supported: use an integer from 2 to 8 (in 3 of 18"),
    (["quant=rtn", "quant.group_size=true"], "quant.group_size=True is not valid"),
    (["quant=rtn", "quant.sym=no"], "quant.sym='no' must be true or false"),
    (["quant=gptq", "calib.n_samples=0"], "calib.n_samples=0 must be an integer of at least 1"),
    (["quant=gptq", "calib.corpus=nowhere"], "calib.corpus: unknown source 'nowhere'"),
    (["quant=fp16", "eval.bos=maybe"], "eval.bos='maybe' must be auto, none or text"),
    (["quant=fp16", "resume=sometimes"], "resume='sometimes' must be same_code or any"),
    (["quant=fp16", "eval.max_windows={pydoc: 0}"], "eval.max_windows={'pydoc': 0} must be a positive integer"),
    (["quant=rtn", "quant.group_size=100000"], "quant.group_size=100000 is wider than every layer's input (96/160"),
    (["quant=fp16", "eval.seqlen=100000"], "eval.seqlen=100000 is longer than the model's context (4096 positions)"),
    (["quant=gptq", "calib.seqlen=8192"], "calib.seqlen=8192 is longer than the model's context (4096 positions)"),
    (["quant=fp16", "eval.speed.prompt_tokens=300"], "eval.speed.prompt_tokens=300 is longer than eval.seqlen=256"),
    (["quant=fp16", "eval.corpora=[nope]"], "eval.corpora: unknown corpus 'nope'"),
    (["quant=fp16", "eval.corpora=[wikitext2:dev]"], "eval.corpora: unknown WikiText-2 split in 'wikitext2:dev'"),
    (["quant=fp16", "eval.tasks=[qb_arithmetc]"], "eval.tasks: 'qb_arithmetc' is not a task lm-eval knows"),
    (["quant=fp16", "+eval.task_data={arc_easy: /nowhere/ARC.jsonl}"], "eval.task_data.arc_easy=/nowhere/ARC.jsonl: "
                                                                       "no such file or folder"),
    (["quant=fp16", "select.max_kl=abc"], "select.max_kl='abc' must be nats per token"),
    (["quant=gptq", "calib.seqlen=1"], "calib.seqlen=1 must be an integer of at least 2"),
    (["quant=gptq", "calib.n_samples=-1"], "calib.n_samples=-1 must be an integer of at least 1"),
])
def test_a_bad_grid_is_refused_before_any_work_one_line_per_problem(tmp_path, overrides, message):
    from harness.cli import check_grid

    problems = check_grid([*TINY, *overrides, f"out_dir={tmp_path}"], multirun=True)
    assert any(message in line for line in problems) and all("\n" not in line for line in problems), problems


def test_an_out_dir_that_cannot_be_written_is_refused_in_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = run_cli("sweep", *TINY, "quant=fp16", f"out_dir={tmp_path / 'a_file' / 'results'}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "cannot be written" in proc.stderr and "choose another out_dir" in proc.stderr


def test_the_cli_refuses_a_bad_grid_with_exit_2_and_measures_nothing(tmp_path):
    proc = run_cli("sweep", *TINY, "quant=fp16,rtn", "quant.bits=8,9,4", f"out_dir={tmp_path}")
    assert proc.returncode == 2 and "quant.bits=9 is not supported" in proc.stderr, proc.stderr[-2000:]
    assert all(line.startswith("error: ") for line in proc.stderr.strip().splitlines())
    assert not (tmp_path / "runs").exists()  # nothing was measured


def test_a_binary_corpus_is_refused_with_one_line(tmp_path):
    proc = run_cli("run", *TINY, "quant=fp16", "eval.corpora=[/bin/ls]", f"out_dir={tmp_path}")
    assert proc.returncode == 2 and "looks like a binary file, not text" in proc.stderr, proc.stderr[-2000:]


def test_a_point_with_non_finite_losses_fails_and_says_why(tmp_path):
    proc = run_cli("run", *TINY, "quant=fp16", "dtype=float16", "+model.config.initializer_range=1.0",
                   "model.config.hidden_size=1024", "model.config.intermediate_size=4096", f"out_dir={tmp_path}")
    assert proc.returncode == 1
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert record["status"] == "failed" and record["error"]["type"] == "FloatingPointError"
    assert "non-finite loss" in record["error"]["message"] and "dtype=float32" in record["error"]["message"]


def test_a_damaged_baseline_reference_is_recomputed_and_records_are_readable_by_others(tmp_path):
    grid = [*TINY, "quant=fp16,rtn", "quant.bits=4", "quant.group_size=32", f"out_dir={tmp_path}"]
    assert run_cli("sweep", *grid).returncode == 0
    [reference] = list((tmp_path / "baseline").glob("*.pt"))
    reference.write_bytes(b"\x00garbage" * 10)
    rtn = next(p for p in (tmp_path / "runs").glob("*.json") if "-rtn-" in p.name)
    rtn.unlink()
    proc = run_cli("sweep", *grid)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is unreadable" in proc.stdout + proc.stderr and json.loads(rtn.read_text())["status"] == "ok"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(rtn.stat().st_mode) == 0o666 & ~umask


def test_a_point_claimed_by_a_live_sweep_is_left_to_it_and_a_dead_claim_is_taken_over(tmp_path):
    grid = [*TINY, "quant=fp16,rtn", "quant.bits=4", "quant.group_size=32", f"out_dir={tmp_path}"]
    assert run_cli("sweep", *grid).returncode == 0
    rtn = next(p for p in (tmp_path / "runs").glob("*.json") if "-rtn-" in p.name)
    rtn.unlink()
    lock = rtn.with_suffix(".lock")
    lock.write_text(f"pid {os.getpid()} on {socket.gethostname()}")  # this test process: alive
    proc = run_cli("sweep", *grid)
    assert "being measured by another sweep" in proc.stdout + proc.stderr and not rtn.exists()
    lock.write_text(f"pid 4194999 on {socket.gethostname()}")  # no such process
    proc = run_cli("sweep", *grid)
    assert proc.returncode == 0 and rtn.exists() and not lock.exists()


def test_ctrl_c_stops_with_one_line_on_how_to_resume_and_keeps_finished_points(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "harness", "sweep", *TINY, "quant=fp16,rtn", "quant.bits=8,4,3",
                             "quant.group_size=-1,32,64", "eval.max_windows=8", f"out_dir={tmp_path}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "runs").glob("*.json")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert all(json.loads(p.read_text())["status"] == "ok" for p in (tmp_path / "runs").glob("*.json"))


def test_a_record_that_cannot_be_written_fails_its_point_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from harness import results
    from harness.sweep import run_point

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    cfg = {"model": {"name": "tiny-llama", "source": "tiny", "config": {}}, "out_dir": str(tmp_path), "seed": 0,
           "device": "cpu", "dtype": "float32", "quant": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False},
           "calib": {"corpus": "self", "n_samples": 2, "seqlen": 16},
           "eval": {"corpora": ["pydoc"], "seqlen": 64, "max_windows": 2, "kl_topk": 8, "tasks": [],
                    "speed": {"prompt_tokens": 8, "decode_tokens": 2, "repeats": 1, "warmup": 0}}}
    monkeypatch.setattr(results, "write_json_atomic", full_disk)
    record = run_point(cfg)
    assert record["status"] == "failed" and "No space left" in record["error"]["message"]
    assert not list((tmp_path / "runs").glob("*.json")) and not list((tmp_path / "runs").glob("*.tmp"))


def test_a_report_that_cannot_be_written_says_the_records_are_kept(sweep, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sweep[0], out)
    (out / "report.md").unlink()
    (out / "report.md").mkdir()  # renaming a file over a folder fails like a full disk does: OSError
    proc = run_cli("report", str(out))
    assert proc.returncode == 2 and "the records are kept: free space, then python -m harness report" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_two_sweeps_in_one_folder_measure_each_point_once_and_leave_it_whole(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    grid = [*TINY, "quant=fp16,rtn", "quant.bits=8,4", "quant.group_size=-1,32", f"out_dir={tmp_path}"]
    procs = [subprocess.Popen([sys.executable, "-m", "harness", "sweep", *grid], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-2000:] + logs[1][-2000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(records) == 5 and all(r["status"] == "ok" for r in records)
    for r in records:  # each point measured by one sweep only
        assert sum(f"{r['run_id']}: ok," in log for log in logs) == 1, r["run_id"]
    assert not list((tmp_path / "runs").glob("*.lock")) and not list((tmp_path / "runs").glob(".*.tmp"))
    assert len(list((tmp_path / "baseline").glob("*.pt"))) == 1


def test_a_catastrophic_but_finite_point_is_measured_and_fails_the_bar_with_its_reason(tmp_path, monkeypatch):
    import math

    from harness.results import load_records
    from harness.select import load_policy, select
    from harness.sweep import run_point
    from quantizers import QUANTIZERS, register

    monkeypatch.setattr("quantizers.registry.QUANTIZERS", dict(QUANTIZERS))  # the test's method stays the test's

    @register("explode_for_test")
    def explode(model, spec, calib, progress=False, device=None):
        model.model.norm.weight.data.mul_(1e5)  # logits ~1e5 apart: an NLL far beyond exp's range, still finite
        return model

    cfg = {"model": {"name": "tiny-llama", "source": "tiny", "config": {}}, "out_dir": str(tmp_path), "seed": 0,
           "device": "cpu", "dtype": "float32", "calib": {"corpus": "self", "n_samples": 2, "seqlen": 16},
           "eval": {"corpora": ["pydoc"], "seqlen": 64, "max_windows": 4, "kl_topk": 8, "tasks": [],
                    "speed": {"prompt_tokens": 8, "decode_tokens": 2, "repeats": 1, "warmup": 0}}}
    base = run_point({**cfg, "quant": {"method": "fp16"}})
    point = run_point({**cfg, "quant": {"method": "explode_for_test", "bits": 4, "group_size": 32, "sym": False}})
    assert base["status"] == point["status"] == "ok", point.get("error")
    assert point["metrics"]["ppl/pydoc"] == math.inf and min(point["per_sample"]["nll/pydoc"]) > 709
    policy = {**load_policy(tmp_path), "max_ppl_increase_pct": None, "max_kl": None}
    judged = {p["label"]: p for p in select(load_records(tmp_path), policy)["points"]}
    [exploded] = [p for p in judged.values() if not p["is_baseline"]]
    ppl = next(c for c in exploded["checks"] if c["name"] == "ppl/pydoc")
    assert not exploded["passed"] and not ppl["passed"] and "overflows" in ppl["reason"]
    # with tasks and adaptive evaluation, the windows alone put it beyond the bar: measured, tasks skipped
    adaptive = {**cfg, "out_dir": str(tmp_path / "adaptive"), "select": {**load_policy(), "max_ppl_increase_pct": 5.0},
                "eval": {**cfg["eval"], "tasks": ["qb_arithmetic"], "task_limit": 4, "adaptive": True}}
    run_point({**adaptive, "quant": {"method": "fp16"}})
    stopped = run_point({**adaptive, "quant": {"method": "explode_for_test", "bits": 4, "group_size": 32,
                                               "sym": False}})
    assert stopped["status"] == "ok" and "ppl/pydoc increase" in stopped["stopped_early"], stopped.get("error")


FLAKY_RTN = """
import dataclasses, sys
from quantizers import registry
rtn = registry.QUANTIZERS["rtn"]
def flaky(model, spec, calib, **kw):
    if spec.bits == 3:
        raise RuntimeError("injected fault at 3 bits")
    return rtn.quantize(model, spec, calib, **kw)
registry.QUANTIZERS["rtn"] = dataclasses.replace(rtn, quantize=flaky)
from harness.cli import main
main(sys.argv[1:])
"""


def test_a_point_that_raises_fails_alone_and_the_summary_names_this_sweeps_failures_only(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    def sweep(*bits):
        return subprocess.run([sys.executable, "-c", FLAKY_RTN, "sweep", *TINY, "quant=fp16,rtn",
                               f"quant.bits={','.join(bits)}", "quant.group_size=32", f"out_dir={tmp_path}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)

    proc = sweep("4", "3")
    assert proc.returncode == 1, proc.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert sorted(r["status"] for r in records) == ["failed", "ok", "ok"]
    [failed] = [r for r in records if r["status"] == "failed"]
    assert f"error: {failed['run_id']} failed: RuntimeError: injected fault at 3 bits" in proc.stderr
    assert "1 failed in this sweep" in proc.stdout and (tmp_path / "report.md").exists()
    again = sweep("4")  # the same folder, a grid without the faulty point: the old failure is not this sweep's
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 failed in this sweep" in again.stdout and "1 failed record(s)" in again.stdout


def test_a_damaged_baseline_record_leaves_no_stale_verdict_or_plots(sweep, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sweep[0], out)
    assert (out / "selection.json").exists() and list((out / "plots").glob("*.png"))
    baseline = next(p for p in (out / "runs").glob("*.json") if json.loads(p.read_text())["quant"]["method"] == "fp16")
    baseline.write_text(baseline.read_text()[: len(baseline.read_text()) // 2])  # cut in half
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "selection.json").exists() and not list((out / "plots").glob("*.png"))
    report = (out / "report.md").read_text()
    assert "the sweep has no baseline point" in report and baseline.name in report


KILL_DURING_A_WRITE = """
import os, signal, sys
from pathlib import Path
real_replace = os.replace
def replace(src, dst):  # the record's bytes are complete in its temporary file: die before it is published
    runs = Path(dst).parent
    if runs.name == "runs" and str(dst).endswith(".json") and len(list(runs.glob("*.json"))) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
from harness.cli import main
main(sys.argv[1:])
"""

TIMING = ("tok_s", "spread_pct", "_time_s", "_eval_s", "mem_bytes")


def _measured(folder):
    """Every record of a sweep folder without what differs between runs by nature (timings, memory, dates)."""
    out = {}
    for p in (folder / "runs").glob("*.json"):
        r = json.loads(p.read_text())
        out[p.name] = (r["status"], r["per_sample"], r["data"], r["quant"],
                       {k: v for k, v in r["metrics"].items() if not k.endswith(TIMING)})
    return out


def test_sigkill_during_a_point_or_a_write_then_a_rerun_ends_with_the_records_of_an_uninterrupted_sweep(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    grid = [*TINY, "quant=fp16,rtn", "quant.bits=8,4", "quant.group_size=32"]
    cli = [sys.executable, "-m", "harness", "sweep", *grid]
    assert subprocess.run([*cli, f"out_dir={tmp_path / 'whole'}"], cwd=ROOT, capture_output=True).returncode == 0
    whole = _measured(tmp_path / "whole")
    assert len(whole) == 3 and all(v[0] == "ok" for v in whole.values())

    killed_in_write = subprocess.run([sys.executable, "-c", KILL_DURING_A_WRITE, "sweep", *grid,
                                      f"out_dir={tmp_path / 'write'}"], cwd=ROOT, capture_output=True, timeout=600)
    assert killed_in_write.returncode == -signal.SIGKILL
    assert len(list((tmp_path / "write" / "runs").glob("*.json"))) == 1

    point = subprocess.Popen([*cli, f"out_dir={tmp_path / 'point'}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "point" / "runs").glob("*.json")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # inside the next point
    point.send_signal(signal.SIGKILL)
    point.wait(timeout=60)

    for name in ("write", "point"):
        rerun = subprocess.run([*cli, f"out_dir={tmp_path / name}"], cwd=ROOT, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert _measured(tmp_path / name) == whole  # identical measurements: resumed exactly, and deterministic
        leftovers = [p.name for p in (tmp_path / name).rglob("*") if p.suffix in (".tmp", ".lock")]
        assert not leftovers, leftovers


def test_a_writer_that_fails_on_a_full_disk_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    import shutil

    import pytest

    from harness import results

    def torch_like_failure(f):
        f.write("half")
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0")

    def disk_usage(folder):  # full while the half-written temporary file takes the space
        free = 0 if list(tmp_path.glob(".*.tmp")) else 10**8
        return shutil._ntuple_diskusage(10**9, 10**9 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(OSError, match="No space left on device while writing reference.pt") as raised:
        results.write_atomic(tmp_path / "reference.pt", torch_like_failure)
    assert raised.value.errno == 28 and not list(tmp_path.iterdir())
