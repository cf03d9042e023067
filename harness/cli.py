"""The command line: sweep | run (Hydra), report DIR, select DIR [policy overrides]."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import CONFIG_DIR
from .errors import UserError

COMMANDS = ("sweep", "run", "report", "select", "bench")
USAGE = """usage: python -m harness COMMAND [args]

  sweep [overrides]          Hydra multirun over the grid in harness/configs/sweep.yaml
  run [overrides]            one grid point
  report DIR                 rebuild tables, plots and report.md from DIR/runs/
  select DIR [key=value ...] the verdict under a policy (harness/configs/select/default.yaml), selection.json
  bench [key=value ...]      kernel speed per backend and precision against bf16 (harness/configs/bench.yaml)

overrides are Hydra's: quant=rtn quant.bits=4,3 quant.group_size=64 model=tiny-llama eval=quick out_dir=DIR"""

def _task(cfg: DictConfig) -> None:
    from .sweep import run_point

    try:
        run_point(OmegaConf.to_container(cfg, resolve=True))
    except UserError as e:
        _die(str(e))
    except KeyboardInterrupt:
        _interrupted()


class FinishSweep(Callback):
    """After the last point (or a single run): tables, plots, selection and report."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(config)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(config)

    @staticmethod
    def _finish(config: DictConfig) -> None:
        from .report import build

        out_dir = Path(config.out_dir)
        try:
            built = build(out_dir, OmegaConf.to_container(config.select, resolve=True))
        except UserError as e:
            _die(str(e))
        except OSError as e:  # the records are safe; the aggregate can be rebuilt once there is room
            _die(_unwritable(out_dir, e))
        from .results import load_records

        failed = [r for r in load_records(out_dir) if r.get("status") == "failed"]
        mine = [r for r in failed if str(r.get("started_at", "")) >= SWEEP_STARTED_AT
                and (SWEEP_RUN_IDS is None or r["run_id"] in SWEEP_RUN_IDS)]
        print(f"report: {out_dir / 'report.md'} ({len(built['frame'])} points, {len(mine)} failed in this sweep)")
        if built["selection"]:
            print(f"verdict: {built['selection']['verdict']}")
        if len(failed) > len(mine):
            print(f"note: {len(failed) - len(mine)} failed record(s) in {out_dir / 'runs'} are not this sweep's "
                  "(earlier sweeps, or another one in this folder)")
        for r in mine:
            error = r.get("error") or {}
            message = str(error.get("message", "")).splitlines()[0][:200] if error.get("message") else ""
            print(f"error: {r['run_id']} failed: {error.get('type')}: {message}", file=sys.stderr)
        if mine:
            sys.exit(1)


def _interrupted() -> None:
    print("\ninterrupted: finished points are kept (runs/*.json); run the same command again to resume",
          file=sys.stderr)
    sys.exit(130)


def _die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


SWEEP_STARTED_AT = ""  # when this command began (UTC, as records' started_at): its failures are the later ones
SWEEP_RUN_IDS: set[str] | None = None  # this grid's points, where check_grid could expand it


def _hydra(argv: list[str], multirun: bool) -> None:
    import hydra

    global SWEEP_STARTED_AT
    SWEEP_STARTED_AT = datetime.now(timezone.utc).isoformat(timespec="seconds")

    problems = check_grid(argv, multirun)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0]] + (["--multirun"] if multirun else []) + argv
    hydra.main(config_path=str(CONFIG_DIR), config_name="sweep", version_base=None)(_task)()


def grid_overrides(argv: list[str], multirun: bool) -> list[list[str]]:
    """Every point's overrides, as Hydra's basic sweeper expands them: the config's hydra.sweeper.params, then
    the command line's (which win), crossed."""
    import itertools

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = parser.parse_overrides(argv)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        base = compose(config_name="sweep", overrides=[o.input_line for o in given if not o.is_sweep_override()],
                       return_hydra_config=True)
    params = dict(base.hydra.sweeper.params or {}) if multirun else {}
    lines = [f"{k}={v}" for k, v in params.items() if k not in {o.get_key_element() for o in given}]
    axes = []
    for o in parser.parse_overrides(lines) + given:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)]


def check_grid(argv: list[str], multirun: bool) -> list[str]:
    """Every problem of every grid point, one line each, before any work; [] if the grid is sound. Command
    lines this check cannot expand (Hydra's own flags, glob sweeps, hydra: interpolations) go to Hydra as
    they are."""
    if any(arg.startswith("-") for arg in argv):
        return []
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .models import model_limits
    from .sweep import check_against_model, check_tasks, make_point

    try:
        points = grid_overrides(argv, multirun)
    except (HydraException, OmegaConfBaseException, ValueError):
        return []  # Hydra itself will say what is wrong, or expand what this cannot
    problems: dict[str, list[str]] = {}
    limits: dict[str, object] = {}
    checked: dict[str, object] = {}
    global SWEEP_RUN_IDS
    run_ids = SWEEP_RUN_IDS = set()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        for overrides in points:
            try:
                cfg = OmegaConf.to_container(compose(config_name="sweep", overrides=overrides), resolve=True)
                point = make_point(cfg)
                run_ids.add(point.run_id)
                check_against_model(point, _cached(limits, cfg["model"], model_limits, cfg["model"]))
                _cached(checked, [cfg["eval"], cfg["out_dir"]], check_tasks, cfg)
            except UserError as e:
                problems.setdefault(str(e), []).append(" ".join(overrides))
            except (HydraException, OmegaConfBaseException, ValueError):
                continue  # left to Hydra
    return [f"{message} (in {len(where)} of {len(points)} points, e.g. {where[0]})" if multirun else message
            for message, where in problems.items()]


def _cached(cache: dict[str, object], key: object, compute, arg: Any):
    """compute(arg) once per distinct key (an error, once raised, is raised again for the same key)."""
    name = json.dumps(key, sort_keys=True, default=str)
    if name not in cache:
        try:
            cache[name] = compute(arg)
        except UserError as e:
            cache[name] = e
    if isinstance(cache[name], UserError):
        raise cache[name]
    return cache[name]


def _report(argv: list[str]) -> None:
    from .report import build
    from .select import load_policy

    if len(argv) != 1:
        raise UserError("report takes one argument: the sweep folder, e.g. python -m harness report results/default")
    out_dir = Path(argv[0])
    try:
        built = build(out_dir, load_policy(out_dir))
    except OSError as e:
        raise UserError(_unwritable(out_dir, e)) from None
    print(f"report: {out_dir / 'report.md'} ({len(built['frame'])} points)")


def _unwritable(out_dir: Path, e: OSError) -> str:
    return (f"could not write the report in {out_dir} ({e.strerror or e}: {e.filename or ''}); the records are "
            f"kept: free space, then python -m harness report {out_dir}")


def _select(argv: list[str]) -> None:
    from .report import mixed_code_versions
    from .results import damaged_records, load_records, write_json_atomic
    from .select import load_policy, select

    if not argv:
        raise UserError("select takes the sweep folder first: python -m harness select results/default max_kl=0.05")
    out_dir = Path(argv[0])
    selection = select(load_records(out_dir), load_policy(out_dir, argv[1:]))
    write_json_atomic(out_dir / "selection.json", selection)
    print(selection_text(selection))
    for line in damaged_records(out_dir):
        print(f"warning: unusable record runs/{line}: its point is not judged", file=sys.stderr)
    versions = mixed_code_versions(load_records(out_dir))
    if versions:
        print(f"warning: points measured by several code versions: {versions}", file=sys.stderr)


def selection_text(selection: dict[str, Any]) -> str:
    """Every point, pass or fail, each check as estimate [bound at the confidence], and the verdict."""
    lines = []
    order = sorted(selection["points"], key=lambda p: (not p["is_baseline"], -(p["bits_per_weight"] or 0), p["label"]))
    for p in order:
        mark = "baseline" if p["is_baseline"] else ("pass" if p["passed"] else "FAIL")
        if p["run_id"] == selection["chosen"]:
            mark = "CHOSEN"
        checks = "  ".join(f"{c['name']} {c['estimate']:+.4g} [{c['upper']:+.4g}]" for c in p["checks"] if c["units"])
        lines.append(f"{mark:<8} {p['label']:<26} {checks}")
        lines += [f"{'':<9}- {reason}" for reason in p["reasons"]] if not p["is_baseline"] else []
    confidence = selection["policy"]["confidence"]
    lines.append(f"(estimate [upper bound at {confidence:.0%}]; perplexity in %; task drops as fractions, "
                 "0.05 = 5 points)")
    lines.append(f"verdict: {selection['verdict']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    try:
        if command in ("sweep", "run"):
            _hydra(rest, multirun=command == "sweep")
        elif command == "report":
            _report(rest)
        elif command == "select":
            _select(rest)
        elif command == "bench":
            from .bench import main as bench

            bench(rest)
        else:
            _die(f"unknown command {command!r}: use one of {', '.join(COMMANDS)}")
    except UserError as e:
        _die(str(e))
    except KeyboardInterrupt:
        _interrupted()
