"""The verdict: the most aggressive point whose quality stays within the policy's bar, with confidence.

A point passes only if every check's bound (Student-t's, paired over the baseline's windows and items,
`harness.stats`) is within its threshold. Among passing points the objective decides; points tied on it
are told apart by quality only where the difference is beyond noise, then by decode speed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from . import CONFIG_DIR, adaptive, stats
from .errors import UserError
from .policy import threshold_for
from .results import load_records

OBJECTIVES = {"weight_bytes": "smallest", "bits_per_weight": "smallest", "decode_tok_s": "largest"}
TIE_TOLERANCE = 0.005  # objectives within 0.5% of each other are a tie (same format, other method)
THRESHOLD_KEYS = ("max_ppl_increase_pct", "max_kl", "max_task_drop")


def load_policy(out_dir: Path | str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """harness/configs/select/default.yaml, then the policy the sweep in `out_dir` ran with, then `key=value` overrides
    (`max_kl=0.05`, `'max_task_drop={qb_arithmetic: 0.1}'`)."""
    policy = OmegaConf.load(CONFIG_DIR / "select" / "default.yaml")
    used = None
    if out_dir is not None:
        records = load_records(Path(out_dir))
        if not records:
            raise UserError(f"{out_dir} holds no run records (runs/*.json): run a sweep with out_dir={out_dir} first")
        used = records[0].get("config", {}).get("select")
    OmegaConf.set_struct(policy, True)
    try:
        if used:
            policy = OmegaConf.merge(policy, used)
        policy = OmegaConf.merge(policy, OmegaConf.from_dotlist([o.removeprefix("select.") for o in overrides]))
    except Exception as e:  # omegaconf raises several types for unknown keys and bad values
        raise UserError(f"bad policy override ({e}); keys are: {', '.join(policy)}") from None
    return OmegaConf.to_container(policy)


def point_label(row: Mapping[str, Any]) -> str:
    bits = row.get("bits")
    if row["method"] == "fp16" or bits is None or pd.isna(bits):
        return str(row["method"])
    group = "per-channel" if row["group_size"] == -1 else f"g{row['group_size']}"
    return f"{row['method']} {bits}-bit {group}{' sym' if row.get('sym') else ''}"


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    quant = record.get("quant", {})
    return {"method": quant.get("method"), "bits": quant.get("bits"), "group_size": quant.get("group_size"),
            "sym": quant.get("sym")}


def baseline_record(records: list[dict[str, Any]], baseline: str = "fp16") -> dict[str, Any]:
    ok = [r for r in records if r["status"] == "ok"]
    found = [r for r in ok if r["run_id"] == baseline] or [r for r in ok if _identity(r)["method"] == baseline]
    if not found:
        raise UserError(f"the sweep has no baseline point ({baseline!r}): add one with quant=fp16 to the same sweep "
                        "(same model and eval settings), e.g. python -m harness run quant=fp16 out_dir=<this folder>")
    if len(found) > 1:
        raise UserError(f"the sweep has {len(found)} baseline points; name one with baseline=<run id>: "
                        + ", ".join(r["run_id"] for r in found))
    return found[0]


def measured(record: dict[str, Any]) -> dict[str, list[str]]:
    """Corpora, tasks and per-item task metrics that a record holds samples of."""
    keys = record.get("per_sample", {})
    tasks = {k.split("/")[1] for k in keys if k.startswith("task/")}
    return {"corpora": sorted(k.removeprefix("nll/") for k in keys if k.startswith("nll/")), "tasks": sorted(tasks),
            "task_metrics": sorted({k.split("/")[2] for k in keys if k.startswith("task/")})}


def _names(policy: dict[str, Any], key: str, known: list[str], what: str) -> list[str]:
    chosen = known if policy.get(key) is None else list(policy[key])
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise UserError(f"select.{key} names {what} the sweep did not measure ({', '.join(unknown)}); "
                        f"it measured: {', '.join(known) or 'none'}")
    return chosen


def check_policy(policy: dict[str, Any], base: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The corpora and tasks the policy judges; every name it uses must be one the sweep measured."""
    check_thresholds(policy)
    if policy["objective"] not in OBJECTIVES:
        raise UserError(f"select.objective={policy['objective']!r} is not known: use one of {', '.join(OBJECTIVES)}")
    if policy["objective"] not in base.get("metrics", {}):
        raise UserError(f"select.objective={policy['objective']} was not measured by this sweep: use one of "
                        + ", ".join(o for o in OBJECTIVES if o in base.get("metrics", {})))
    have = measured(base)
    if not have["corpora"] and not have["tasks"]:
        raise UserError("the baseline record holds no per-window or per-item samples (per_sample): it predates "
                        "them; rerun the sweep into a new out_dir")
    corpora = _names(policy, "corpora", have["corpora"], "corpora")
    tasks = _names(policy, "tasks", have["tasks"], "tasks")
    falls_back = policy["task_metric"] == "acc_norm" and "acc" in have["task_metrics"]  # acc where no acc_norm
    if tasks and policy["task_metric"] not in have["task_metrics"] and not falls_back:
        raise UserError(f"select.task_metric={policy['task_metric']!r} was not measured; the sweep measured: "
                        f"{', '.join(have['task_metrics'])}")
    for key, names, what in (("max_ppl_increase_pct", have["corpora"], "corpora"),
                             ("max_kl", have["corpora"], "corpora"), ("max_task_drop", have["tasks"], "tasks")):
        if isinstance(policy.get(key), Mapping):
            _names({key: list(policy[key])}, key, names, what)
    return corpora, tasks


THRESHOLDS = {"max_ppl_increase_pct": "a percentage", "max_kl": "nats per token, at least 0",
              "max_task_drop": "an accuracy drop (0.05 = 5 points)", "max_mean_task_drop": "an accuracy drop"}


def check_thresholds(policy: Mapping[str, Any]) -> None:
    """Every threshold a finite number (a {name: number} map where allowed) or null; KL bars not negative."""
    for key, what in THRESHOLDS.items():
        value = policy.get(key)
        values = value.values() if isinstance(value, Mapping) and key != "max_mean_task_drop" else [value]
        for v in values:
            ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            if not ok or (key == "max_kl" and v is not None and v < 0):
                raise UserError(f"select.{key}={value!r} must be {what}: a number, a {{name: number}} map, or null")
    samples = policy.get("bootstrap_samples", 2000)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserError(f"select.bootstrap_samples={samples!r} must be a positive integer, e.g. 2000")
    confidence = policy.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1:
        raise UserError(f"select.confidence={confidence!r} must be a number in [0.5, 1), e.g. 0.95")


def _task_samples(record: dict[str, Any], task: str, metric: str) -> list[float] | None:
    """Per-item correctness under `metric`, or acc where the task has no such metric (e.g. no acc_norm)."""
    samples = record.get("per_sample", {})
    return samples.get(f"task/{task}/{metric}", samples.get(f"task/{task}/acc"))


class _Judge:
    """Checks of one sweep's points against its baseline, with the same bootstrap draws for every point."""

    def __init__(self, base: dict[str, Any], policy: dict[str, Any], corpora: list[str], tasks: list[str]):
        self.base, self.policy, self.corpora, self.tasks = base, policy, corpora, tasks
        self.confidence = float(policy["confidence"])
        self._draws: dict[str, Any] = {}

    def index(self, key: str, units: int):
        if key not in self._draws:
            self._draws[key] = stats.draws(key, units, int(self.policy["bootstrap_samples"]), int(self.policy["seed"]))
        return self._draws[key]

    def checks(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        base, point, out = self.base["per_sample"], record.get("per_sample", {}), []
        model, base_model = record.get("model", {}).get("name"), self.base.get("model", {}).get("name")
        if model != base_model:  # another model's windows are other tokens: nothing is paired
            return [{**_unpaired("model"), "reason": f"model {model} is not the baseline's ({base_model})"}]
        if _model_settings(record) != _model_settings(self.base):  # e.g. another model.config of a random model
            return [{**_unpaired("model"), "reason": f"model: its settings {_model_settings(record)} are not the "
                                                    f"baseline's {_model_settings(self.base)}"}]
        differs = _differs(_setting(record), _setting(self.base), ("dtype", "device"))
        if differs:  # a bf16 point against a float32 baseline measures the dtype, not the quantization
            return [{**_unpaired("model"), "reason": f"model: {differs}"}]
        for c in self.corpora:
            nll = point.get(f"nll/{c}")
            differs = _differs(_corpus(record, c), _corpus(self.base, c), ("text", "seqlen", "windows", "bos"))
            if differs:
                out.append({**_unpaired(f"ppl/{c}"), "reason": f"ppl/{c}: {differs}"})
                continue
            if nll is None or len(nll) != len(base[f"nll/{c}"]):
                out.append(_unpaired(f"ppl/{c}"))
                continue
            out.append(self._check(f"ppl/{c}", "max_ppl_increase_pct", c,
                                   stats.ppl_increase_pct(base[f"nll/{c}"], nll, self.confidence), "%"))
            kl = point.get(f"kl/{c}", [0.0] * len(nll) if record is self.base else None)  # zero only for itself
            if kl is None or len(kl) != len(nll):
                out.append({**_unpaired(f"kl/{c}"), "reason": f"kl/{c} not measured for this point"})
                continue
            topk, base_topk = _kl_topk(record), _kl_topk(self.base)
            if topk != base_topk:  # KL over the top-k is a lower bound that depends on k
                out.append({**_unpaired(f"kl/{c}"), "reason": f"kl/{c}: not paired: kl_topk {topk} ≠ baseline's "
                                                              f"{base_topk}"})
                continue
            out.append(self._check(f"kl/{c}", "max_kl", c, stats.mean_value(kl, self.confidence), ""))
        drops, replicates = [], []
        for t in self.tasks:
            b, p = _task_samples(self.base, t, self.policy["task_metric"]), _task_samples(record, t,
                                                                                          self.policy["task_metric"])
            differs = _differs(_task(record, t), _task(self.base, t), ("items", "version", "n_shot"))
            if differs and p is not None:
                out.append({**_unpaired(f"task/{t}"), "reason": f"task/{t}: {differs}"})
                continue
            if p is None or len(p) != len(b):
                out.append(_unpaired(f"task/{t}", record.get("stopped_early")))
                continue
            bound, reps = stats.accuracy_drop(b, p, self.confidence)
            drops.append(bound)
            replicates.append(reps)
            out.append(self._check(f"task/{t}", "max_task_drop", t, bound, ""))
        if drops and len(drops) == len(self.tasks):
            out.append(self._check("task/mean", "max_mean_task_drop", "mean",
                                   stats.mean_of(drops, replicates, self.confidence), ""))
        return out

    def _check(self, name: str, key: str, item: str, bound: stats.Bound, unit: str) -> dict[str, Any]:
        threshold = self.policy.get(key) if key == "max_mean_task_drop" else threshold_for(self.policy, key, item)
        finite = math.isfinite(bound.estimate) and math.isfinite(bound.upper)
        passed = finite and (threshold is None or bound.upper <= threshold)
        if passed:
            reason = None
        elif bound.estimate == math.inf:  # measured, and catastrophic: a finite loss whose exp overflows
            reason = f"{name} overflows: the point's loss is catastrophically above the baseline's"
        elif not finite:
            reason = f"{name} is not a finite number ({bound.estimate})"
        else:
            reason = f"{name} bound {bound.upper:+.4g}{unit} > {threshold}{unit} (estimate {bound.estimate:+.4g}{unit})"
        # Better than the baseline only if even the bound says so; a lucky estimate is not "better".
        return {"name": name, **bound.as_dict(), "threshold": threshold, "passed": passed, "reason": reason,
                "better": bound.upper < 0 and not name.startswith("kl/")}

    def quality_units(self, record: dict[str, Any]) -> list[float]:
        """Per-unit losses used to tell tied points apart: NLL per window, else errors per task item."""
        samples = record.get("per_sample", {})
        if self.corpora:
            return [v for c in self.corpora for v in samples.get(f"nll/{c}", [])]
        return [1 - v for t in self.tasks for v in (_task_samples(record, t, self.policy["task_metric"]) or [])]


def _corpus(record: dict[str, Any], corpus: str) -> tuple:
    """What makes two records' windows the same: the text's hash, the window length and count."""
    d = record.get("data", {}).get("eval", {}).get(corpus, {})
    return d.get("sha256"), d.get("seqlen"), d.get("windows"), d.get("bos", False)


def _model_settings(record: dict[str, Any]) -> dict[str, Any]:
    """What else besides its name makes a model: its source and config overrides (a random model's shape)."""
    cfg = record.get("config", {}).get("model") or {}
    return {k: v for k, v in cfg.items() if k != "name"}


def _kl_topk(record: dict[str, Any]) -> Any:
    return record.get("config", {}).get("eval", {}).get("kl_topk")


def _setting(record: dict[str, Any]) -> tuple:
    return record.get("model", {}).get("dtype"), record.get("env", {}).get("device")


def _task(record: dict[str, Any], task: str) -> tuple:
    """What makes two records' task items the same: lm-eval's hash of each item, the task's version, its shots."""
    d = record.get("data", {}).get("tasks", {}).get(task, {})
    return d.get("items_sha256"), d.get("version"), d.get("n_shot")


def _differs(mine: tuple, baseline: tuple, names: tuple[str, ...]) -> str | None:
    """One line naming what differs from the baseline's."""
    diffs = [f"{n} {a!r} ≠ baseline's {b!r}" if n != "text" and n != "items" else f"other {n} than the baseline's"
             for n, a, b in zip(names, mine, baseline, strict=True) if a != b]
    return "not paired: " + ", ".join(diffs) if diffs else None


def _stopped_reason(record: dict[str, Any], base: dict[str, Any], policy: dict[str, Any], corpora: list[str]) -> str:
    """Why a point stopped early fails now: under this policy it is still clearly beyond the bar after its
    windows, or its tasks, never run, are needed to judge it (the sweep stopped it under a stricter bar)."""
    base_nll = {c: base["per_sample"][f"nll/{c}"] for c in corpora}
    samples = record.get("per_sample", {})
    reason = adaptive.decided_fail(
        base_nll, {c: samples[f"nll/{c}"] for c in corpora if f"nll/{c}" in samples},
        {c: samples[f"kl/{c}"] for c in corpora if f"kl/{c}" in samples}, {**policy, "corpora": corpora},
        float(record.get("config", {}).get("eval", {}).get("adaptive_confidence", 0.995)))
    if reason:
        return f"tasks not run: beyond the bar after its windows ({reason})"
    return (f"tasks not measured: the sweep stopped this point under its own bar ({record['stopped_early']}), "
            "and this bar needs them: rerun the sweep into the same folder with eval.adaptive=false")


def _unpaired(name: str, stopped_early: str | None = None) -> dict[str, Any]:
    """A check without paired samples fails; `not_run` marks one skipped by adaptive evaluation."""
    reason = (f"{name} not run (stopped early)" if stopped_early
              else f"{name} not measured on the baseline's windows or items")
    return {"name": name, "estimate": math.nan, "upper": math.nan, "lower": math.nan, "units": 0, "threshold": None,
            "passed": False, "reason": reason, "better": False, "not_run": bool(stopped_early)}


def select(records: list[dict[str, Any]], policy: dict[str, Any]) -> dict[str, Any]:
    """Judge every point against the baseline; choose the passing quantized point with the best objective."""
    base = baseline_record(records, str(policy.get("baseline", "fp16")))
    corpora, tasks = check_policy(policy, base)
    judge = _Judge(base, policy, corpora, tasks)
    objective = policy["objective"]
    points = []
    for record in records:
        point = {"run_id": record["run_id"], "label": point_label(_identity(record)), **_identity(record),
                 "is_baseline": record is base, "status": record["status"]}
        metrics = record.get("metrics", {})
        point.update({k: metrics.get(k) for k in ("weight_bytes", "bits_per_weight", "decode_tok_s")})
        point["speed_note"] = record.get("speed_note")
        point["stopped_early"] = record.get("stopped_early")
        point["in_domain"] = record.get("in_domain") or []
        point["device"] = record.get("env", {}).get("device")
        samples = record.get("per_sample", {})
        point["windows"] = sum(len(v) for k, v in samples.items() if k.startswith("nll/"))
        point["items"] = sum(len(v) for k, v in samples.items() if k.startswith("task/") and k.endswith("/acc"))
        if record["status"] != "ok":
            point.update(checks=[], passed=False, reasons=[f"the run failed: {record.get('error', {}).get('message')}"])
        else:
            point["checks"] = judge.checks(record)
            point["reasons"] = [c["reason"] for c in point["checks"] if not c["passed"] and not c.get("not_run")]
            if record.get("stopped_early"):
                point["reasons"].append(_stopped_reason(record, base, policy, corpora))
            point["passed"] = not point["reasons"]
        points.append(point)
    candidates = [p for p in points if p["passed"] and not p["is_baseline"]]
    chosen, why = _choose(candidates, objective, judge, {r["run_id"]: r for r in records})
    closest = None if chosen else _closest([p for p in points if not p["is_baseline"] and p["status"] == "ok"])
    return {"policy": dict(policy), "baseline": base["run_id"], "corpora": corpora, "tasks": tasks,
            "chosen": chosen and chosen["run_id"], "chosen_label": chosen and chosen["label"],
            "closest": closest and closest["run_id"], "tie_break": why,
            "verdict": _verdict(chosen, closest, why, objective, float(policy["confidence"]), len(points)),
            "points": points}


def _choose(candidates: list[dict], objective: str, judge: _Judge, records: dict[str, dict]) -> tuple[dict | None, str]:
    """The passing point with the best objective, and why it over the others; points whose objective was not
    measured (no kernel timed them) cannot be ranked on it and are named instead."""
    unmeasured = [p["label"] for p in candidates if p[objective] is None or math.isnan(p[objective])]
    measured_ = [p for p in candidates if p["label"] not in unmeasured]
    note = (f"{', '.join(unmeasured)} {'also passed' if measured_ else 'pass the bar'}, but {objective} was not "
            "measured for them") if unmeasured else ""
    if not measured_:
        return None, note
    chosen, why = _best(measured_, objective, judge, records)
    return chosen, "; ".join(text for text in (why, note) if text)


def _best(candidates: list[dict], objective: str, judge: _Judge, records: dict[str, dict]) -> tuple[dict, str]:
    sign = 1 if OBJECTIVES[objective] == "smallest" else -1
    best = min(sign * p[objective] for p in candidates)
    tied = [p for p in candidates if sign * p[objective] <= best + TIE_TOLERANCE * abs(best)]
    if len(tied) == 1:
        return tied[0], ""
    units = {p["run_id"]: judge.quality_units(records[p["run_id"]]) for p in tied}
    index = judge.index("tie-break", len(next(iter(units.values()))))

    def beaten(p: dict) -> bool:  # another tied point is better beyond noise
        return any(stats.difference_upper(units[q["run_id"]], units[p["run_id"]], index, judge.confidence) < 0
                   for q in tied if q is not p)

    survivors = [p for p in tied if not beaten(p)]

    def loss(p: dict) -> float:
        return sum(units[p["run_id"]]) / len(units[p["run_id"]])

    chosen = max(survivors, key=lambda p: (_speed(p), -loss(p)))
    dropped = [p["label"] for p in tied if p not in survivors]
    why = f"tied on {objective} with {', '.join(p['label'] for p in tied if p is not chosen)}"
    if dropped:
        why += f"; worse beyond noise: {', '.join(dropped)}"
    if len(survivors) > 1:
        why += f"; the rest indistinguishable in quality at {judge.confidence:.0%}, chosen on decode speed"
    return chosen, why


def _speed(point: dict) -> float:
    speed = point.get("decode_tok_s")
    return -math.inf if speed is None or math.isnan(speed) else speed


def _closest(failed: list[dict]) -> dict | None:
    """The failing point nearest the bar: the smallest worst excess of a bound over its threshold."""
    def excess(p: dict) -> float:
        worst = [(c["upper"] - c["threshold"]) / max(abs(c["threshold"]), 1e-9)
                 for c in p["checks"] if not c["passed"] and c["threshold"] is not None]
        return max(worst, default=math.inf)

    return min(failed, key=excess, default=None)


def _verdict(chosen: dict | None, closest: dict | None, why: str, objective: str, confidence: float,
             n_points: int) -> str:
    if n_points == 1:
        return ("The sweep has only its baseline: add quantized points to the same out_dir "
                "(e.g. quant=rtn quant.bits=8,4).")
    if chosen is None and why:
        return f"No point can be chosen on {objective}: {why} (no kernel timed them); choose on objective=weight_bytes."
    if chosen is None:
        text = (f"No quantized point passes the bar at {confidence:.0%} confidence: keep the baseline, "
                "or relax the policy.")
        if closest is not None:
            text += f" Closest: {closest['label']} ({'; '.join(closest['reasons'])})."
        return text
    text = (f"{chosen['label']} is the most aggressive point that passes the bar at {confidence:.0%} confidence "
            f"({OBJECTIVES[objective]} {objective}).")
    return text + (f" It was {why}." if why else "")


def frame_of_checks(selection: dict[str, Any]) -> pd.DataFrame:
    """One row per point and check: estimate, bounds, threshold, pass."""
    rows = [{"run_id": p["run_id"], "label": p["label"], **c} for p in selection["points"] for c in p["checks"]]
    return pd.DataFrame(rows)
