"""`pip install .` (not editable) into a fresh virtual environment, then a sweep from an empty folder: the
configs come with the package and the results land under the folder it runs in."""

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT


def test_a_non_editable_install_sweeps_from_an_empty_folder(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies come from this environment (no network in CI), the package itself does not: a path in
    # a .pth file does not run that folder's own .pth files, so this checkout's editable install stays out
    deps = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (purelib / "deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    build = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                            str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    where = subprocess.run([python, "-c", "import harness; print(harness.CONFIG_DIR)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert str(ROOT) not in where and (Path(where) / "sweep.yaml").exists()
    proc = subprocess.run([python, "-m", "harness", "sweep", "eval=quick"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (work / "results" / "default" / "runs").glob("*.json")]
    assert len(records) == 10 and all(r["status"] == "ok" for r in records)
    assert (work / "results" / "default" / "report.md").exists()
