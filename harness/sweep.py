"""One grid point end to end: load, quantize, evaluate, record. Resume by config hash; failures isolated."""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import quantizers
from quantizers import QuantSpec, QuantSpecError

from . import adaptive, calibration, data, offline_tasks, results, task_data
from .errors import UserError
from .metrics import divergence, memory, perplexity, speed, tasks
from .models import load_model, resolve_device, resolve_dtype, resolve_source

log = logging.getLogger(__name__)


@dataclass
class Point:
    """A validated grid point: what decides its identity (and so resume) is `identity`."""

    cfg: dict[str, Any]
    spec: QuantSpec
    device: str
    dtype: torch.dtype
    needs_calibration: bool
    backend: str  # QuantLinear's kernels: auto, or a name from quantizers.BACKENDS

    @property
    def identity(self) -> dict[str, Any]:
        # adaptive evaluation decides how much of a point to measure, not what it measures: a point stopped
        # early is completed in place when it is asked for with eval.adaptive=false
        ev = {k: v for k, v in self.cfg["eval"].items() if k not in ("adaptive", "adaptive_confidence")}
        identity = {
            "model": self.cfg["model"], "quant": self.spec.to_dict(), "eval": ev,
            "calib": self.cfg["calib"] if self.needs_calibration else None,
            "seed": self.cfg["seed"], "dtype": str(self.dtype), "device": self.device, "backend": self.backend,
        }
        if self.halved:  # another calib.corpus would evaluate the whole text: another point
            identity["halved"] = self.halved
        return identity

    @property
    def run_id(self) -> str:
        model = Path(str(self.cfg["model"]["name"])).name.removesuffix(".gguf").lower()
        return f"{model}-{self.spec.label}-{results.config_hash(self.identity)}"

    @property
    def baseline_key(self) -> dict[str, Any]:
        ev = self.cfg["eval"]
        return {"model": self.cfg["model"], "seed": self.cfg["seed"], "dtype": str(self.dtype), "device": self.device,
                "corpora": ev["corpora"], "seqlen": ev["seqlen"], "max_windows": ev["max_windows"],
                "kl_topk": ev["kl_topk"], "bos": ev.get("bos", "none"), "code": results.code_version(),
                "halved": self.halved}

    @property
    def halved(self) -> list[str]:
        """Evaluated local texts that are also calibration sources, and so evaluated on one half only."""
        sources = calibration.sources(self.cfg.get("calib", {}).get("corpus", "self"))
        return sorted(c for c in self.cfg["eval"]["corpora"] if c in sources and Path(c).expanduser().is_file())


def make_point(cfg: dict[str, Any]) -> Point:
    """Validate a resolved config; every problem the user can fix raises UserError."""
    q = cfg["quant"]
    knobs = {k: v for k, v in q.items()
             if k not in ("method", "bits", "group_size", "sym", "quantize_lm_head", "backend")}
    backend = str(q.get("backend", "auto"))
    if backend != "auto" and backend not in quantizers.BACKENDS:
        raise UserError(f"quant.backend={backend!r} is not known: use auto or one of {', '.join(quantizers.BACKENDS)}")
    try:
        quantizer = quantizers.get_quantizer(q["method"])
        spec = QuantSpec(q["method"], q.get("bits"), q.get("group_size"), q.get("sym", False),
                         q.get("quantize_lm_head", False), knobs)
        quantizer.check_options(spec.options)
    except QuantSpecError as e:
        raise UserError(str(e)) from None
    _validate_eval(cfg["eval"])
    if cfg.get("select") is not None:
        from .select import check_thresholds

        check_thresholds(cfg["select"])
    if cfg.get("resume", "same_code") not in ("same_code", "any"):
        raise UserError(f"resume={cfg.get('resume')!r} must be same_code or any")
    if quantizer.needs_calibration:
        calibration.check(cfg["calib"])
    resolve_source(cfg["model"])  # a missing path fails here, before any work
    device = resolve_device(cfg["device"])
    return Point(cfg, spec, device, resolve_dtype(cfg["dtype"], device), quantizer.needs_calibration,
                 "auto" if spec.is_baseline else backend)


def _validate_eval(ev: dict[str, Any]) -> None:
    if not ev.get("corpora"):
        raise UserError("eval.corpora is empty: name at least one corpus, e.g. eval.corpora=[pydoc]")
    for key, low in (("seqlen", 2), ("kl_topk", 1)):
        if not isinstance(ev.get(key), int) or ev[key] < low:
            raise UserError(f"eval.{key}={ev.get(key)!r} must be an integer of at least {low}")
    limits = ev.get("max_windows")
    for limit in (limits.values() if isinstance(limits, dict) else [limits]):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UserError(f"eval.max_windows={limits!r} must be a positive integer, null for all windows, or a "
                            "mapping of corpora to those (a corpus not named: all its windows)")
    if not isinstance(ev.get("tasks", []), list):
        raise UserError(f"eval.tasks={ev['tasks']!r} must be a list of lm-eval task names, e.g. [qb_arithmetic]")
    if ev.get("bos", "none") not in ("auto", "none", "text"):
        raise UserError(f"eval.bos={ev.get('bos')!r} must be auto, none or text")
    task_data_ = ev.get("task_data") or {}
    if not isinstance(task_data_, dict) or not all(isinstance(v, str) for v in task_data_.values()):
        raise UserError(f"eval.task_data={task_data_!r} must map lm-eval task names to files or folders, e.g. "
                        "eval.task_data={arc_easy: data/ARC-Easy-Test.jsonl}")
    if ev.get("task_limit") is not None and (not isinstance(ev["task_limit"], int) or ev["task_limit"] < 1):
        raise UserError(f"eval.task_limit={ev['task_limit']!r} must be a positive integer, or null for all items")
    confidence = ev.get("adaptive_confidence", 0.995)
    if not isinstance(confidence, float) or not 0.5 <= confidence < 1:
        raise UserError(f"eval.adaptive_confidence={confidence!r} must be a number in [0.5, 1), e.g. 0.995")
    for key in ("prompt_tokens", "decode_tokens", "repeats"):
        if not isinstance(ev["speed"].get(key), int) or ev["speed"][key] < 1:
            raise UserError(f"eval.speed.{key}={ev['speed'].get(key)!r} must be a positive integer")
    if ev["speed"]["prompt_tokens"] > ev["seqlen"]:
        raise UserError(f"eval.speed.prompt_tokens={ev['speed']['prompt_tokens']} is longer than eval.seqlen="
                        f"{ev['seqlen']} (the prompt is cut from an evaluation window): use at most {ev['seqlen']}")
    for corpus in ev["corpora"]:
        data.check_corpus_name(str(corpus), "eval.corpora")


def check_tasks(cfg: dict[str, Any]) -> None:
    """Before any work: the sweep folder can be written, every task name is known and every task file exists."""
    out_dir = Path(cfg["out_dir"]).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UserError(f"out_dir={cfg['out_dir']} cannot be written ({e.strerror or e}): choose another out_dir") \
            from None
    ev = cfg["eval"]
    for key in ("task_data", "local_tasks"):
        for name, where in (ev.get(key) or {}).items():
            if not Path(str(where)).expanduser().exists():
                raise UserError(f"eval.{key}.{name}={where}: no such file or folder")
            if key == "task_data":
                task_data.check_known(name)
    own = {*offline_tasks.TASKS, *(ev.get("task_data") or {}), *(ev.get("local_tasks") or {})}
    others = [t for t in ev.get("tasks") or [] if t not in own]
    if others:
        tasks.check_task_names(others, tasks.task_manager(None), own)


def check_against_model(point: Point, limits) -> None:
    """The settings that only the model can refute: lengths against its context, group sizes against its widths."""
    if limits is None:
        return
    ev, calib = point.cfg["eval"], point.cfg["calib"]
    speed = ev["speed"]
    lengths = [("eval.seqlen", ev["seqlen"]),
               ("eval.speed.prompt_tokens + decode_tokens", speed["prompt_tokens"] + speed["decode_tokens"])]
    if point.needs_calibration:
        lengths.append(("calib.seqlen", calib["seqlen"]))
    for key, length in lengths:
        if limits.context is not None and length > limits.context:
            raise UserError(f"{key}={length} is longer than the model's context ({limits.context} positions): use at "
                            f"most {limits.context}")
    group = point.spec.group_size
    if not point.spec.is_baseline and group not in (None, -1) and limits.widths and group > max(limits.widths):
        widths = "/".join(map(str, limits.widths))
        raise UserError(f"quant.group_size={group} is wider than every layer's input ({widths} columns): that is one "
                        "group per row; say quant.group_size=-1 for per-channel")


def run_point(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume past) one grid point and return its record."""
    point = make_point(cfg)
    path = results.runs_dir(Path(cfg["out_dir"])) / f"{point.run_id}.json"
    done = results.read_record(path)
    completing = done is not None and bool(done.get("stopped_early")) and not cfg["eval"].get("adaptive")
    if done is not None and done.get("status") == "ok" and not completing:
        made_by = done.get("env", {}).get("code_version")
        if _same_code(done, cfg):
            log.info("%s: already done, skipped (%s)", point.run_id, path)
            return done
        log.info("%s: its record was made by code %s, this is %s: measuring it again (resume=any keeps it)",
                 point.run_id, made_by, results.code_version())
    with _claim(path.with_suffix(".lock")) as holder:
        if holder is not None:
            log.warning("%s: being measured by another sweep (%s): skipped here; if none runs, delete %s",
                        point.run_id, holder, path.with_suffix(".lock"))
            return done or {"run_id": point.run_id, "status": "claimed", "claimed_by": holder}
        _remove_leftovers(path)
        again = results.read_record(path)  # another sweep may have finished it while this one looked
        if again != done and again is not None and again.get("status") == "ok" and _same_code(again, cfg):
            return again
        with gpu_slot(Path(cfg["out_dir"]), point.device):
            return _measure(point, cfg, path)


def _remove_leftovers(record: Path) -> None:
    """Temporary files of a writer killed before it renamed them: while this process holds the point's claim,
    no live one writes its record; a claim's temporary file names its process."""
    for tmp in record.parent.glob(f".{record.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
    for tmp in record.parent.glob(f".{record.stem}.lock.{socket.gethostname()}.*.tmp"):  # this host's only
        pid = tmp.name.split(".")[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def gpu_slot(out_dir: Path, device: str):
    """With several GPUs visible, the point takes one no other worker of this folder holds (parallel workers of
    a launcher then get one GPU each) and makes it the current device; with one, it changes nothing."""
    count = torch.cuda.device_count() if device == "cuda" else 0
    if count < 2:
        yield None
        return
    while True:
        for index in range(count):
            with _claim(out_dir / "runs" / f".gpu{index}.lock") as holder:
                if holder is None:
                    torch.cuda.set_device(index)
                    yield index
                    return
        time.sleep(1.0)


def _same_code(record: dict[str, Any], cfg: dict[str, Any]) -> bool:
    made_by = record.get("env", {}).get("code_version")
    return cfg.get("resume", "same_code") == "any" or made_by == results.code_version()


@contextmanager
def _claim(lock: Path):
    """Claim a point for this process: yields None when claimed, or who holds it (a live process of this host).
    A claim whose process is gone is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    mine = lock.with_name(f".{lock.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    mine.write_text(me)  # complete before it is published: a reader never sees a half-written claim
    try:
        for _ in range(2):
            try:
                os.link(mine, lock)
            except FileExistsError:
                if _alive(lock):
                    yield lock.read_text(errors="replace").strip()
                    return
                lock.unlink(missing_ok=True)  # its process died (or went silent for CLAIM_TTL_S): free
                continue
            try:
                yield None
            finally:
                lock.unlink(missing_ok=True)
            return
        yield None  # could not settle the claim: measure anyway (a record is written atomically either way)
    finally:
        mine.unlink(missing_ok=True)


CLAIM_TTL_S = 6 * 3600  # a claim of another machine older than this is taken to be dead


def _alive(lock: Path) -> bool:
    try:
        holder, age_s = lock.read_text(errors="replace"), time.time() - lock.stat().st_mtime
    except OSError:
        return False
    parts = holder.split()
    if len(parts) != 4 or parts[0] != "pid" or not parts[1].isdigit():
        return False  # not a claim this code wrote
    if parts[3] != socket.gethostname():
        return age_s < CLAIM_TTL_S  # another machine's process (a shared folder): not checkable from here
    return _pid_alive(int(parts[1]))


def _measure(point: Point, cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    _seed_everything(cfg["seed"])
    started_at, start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    record: dict[str, Any] = {
        "run_id": point.run_id, "status": "ok", "error": None, "config": cfg, "quant": point.spec.to_dict(),
        "env": results.environment(point.device), "started_at": started_at,
    }
    phase = _Phases()
    try:
        record.update(_evaluate(point, phase))
    except UserError:
        raise
    except Exception as e:  # isolate the failure: record it, let the sweep go on
        log.error("%s failed: %s: %s", point.run_id, type(e).__name__, e)
        record.update(status="failed", error={"type": type(e).__name__, "message": str(e),
                                              "traceback": traceback.format_exc()})
    record["duration_s"] = time.perf_counter() - start
    record["phases_s"] = {**phase.seconds, "other": record["duration_s"] - sum(phase.seconds.values())}
    try:
        results.write_json_atomic(path, record)
    except OSError as e:  # a full or read-only disk: this point is lost, the sweep goes on
        log.error("%s: its record could not be written (%s): the point will be measured again next run",
                  point.run_id, e)
        record.update(status="failed", error={"type": type(e).__name__, "message": f"record not written: {e}"})
    log.info("%s: %s, %.1f s, %s", point.run_id, record["status"], record["duration_s"], _headline(record))
    return record


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _headline(record: dict[str, Any]) -> str:
    m = record.get("metrics", {})
    return ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k.startswith(("ppl/", "kl/")) or k == "bits_per_weight")


class _Phases:
    """Wall seconds per phase of a point; what no phase covers is the point's overhead."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _evaluate(point: Point, phase: _Phases) -> dict[str, Any]:
    cfg, ev = point.cfg, point.cfg["eval"]
    with phase("load"):
        loaded = load_model(cfg["model"], point.dtype, point.device, cfg["seed"])
        model, tokenizer = loaded.model, loaded.tokenizer
        texts = {name: data.tokenize(tokenizer, _corpus(cfg, name, "eval"), "eval", ev.get("bos", "none"))
                 for name in ev["corpora"]}
        windows = {name: data.eval_windows(t.ids, ev["seqlen"], _max_windows(ev, name)) for name, t in texts.items()}
        reference_path = Path(cfg["out_dir"]) / "baseline" / f"{results.config_hash(point.baseline_key)}.pt"
        reference, reference_nll = _load_reference(reference_path, texts)
        baseline_linears = list(quantizers.arch.target_linears(model, point.spec.quantize_lm_head))
        if not point.spec.is_baseline:
            plan_backends(point, model)

    if reference is None and not point.spec.is_baseline:
        with phase("reference"):
            reference, reference_nll = _reference_once(reference_path, model, windows, texts, ev["kl_topk"])
    with phase("task_setup"):
        task_folder, task_manager, task_sources = _prepare_tasks(ev, cfg)
    with phase("calibration"):
        calib, calib_info = _calibration(point, model, tokenizer)

    with phase("quantize"):
        start = time.perf_counter()
        quantizers.quantize(model, point.spec, calib, progress=True)
        quant_time_s = time.perf_counter() - start
        kernels = quantizers.use_backend(model, point.backend)

    metrics: dict[str, float] = {"quant_time_s": quant_time_s}
    per_sample: dict[str, list[float]] = {}
    # quality depends on the weights' values, not the kernel: where the kernels would dequantize at every
    # call, the many-token passes use the same values dequantized once
    with quantizers.dequantized_once(model, point.dtype) as kept_bytes:
        with phase("quality"), memory.PeakMemory(torch.device(point.device)) as peak:
            own = {}
            for name, w in windows.items():
                ref = None if reference is None else reference[name]
                own[name] = quality = _quality_pass(model, w, ref, ev["kl_topk"], f"eval {name}")
                metrics.update(quality.metrics(name))
                per_sample.update(quality.per_sample(name))
            if reference is None:  # the baseline point made the reference itself, unless another sweep did
                with _claim(reference_path.with_suffix(".lock")) as holder:
                    if holder is None and _load_reference(reference_path, texts)[0] is None:
                        _save_reference(reference_path, own, texts)
        metrics["peak_mem_bytes"] = max(peak.peak_bytes - kept_bytes, 0)  # the deployed model keeps no dense copy
        stopped = _decided_fail(point, reference_nll, per_sample)
        if task_folder is not None and stopped is None:
            with phase("tasks"):
                task_metrics, task_items, task_info = _task_metrics(model, tokenizer, ev, cfg, task_folder,
                                                                    task_manager)
            metrics.update(task_metrics)
            task_sources = {t: {**task_sources.get(t, {}), **about} for t, about in task_info.items()}
            per_sample.update(task_items)
    speed_note = no_kernel_note(point, kernels)
    if speed_note is None:
        with phase("speed"), memory.PeakMemory(torch.device(point.device)) as speed_peak:
            metrics.update(_speed_metrics(model, windows[ev["corpora"][0]][0], ev["speed"]))
        if point.device == "cuda":  # the weights, the KV cache and the activations at the timed settings
            metrics["speed_peak_mem_bytes"] = speed_peak.peak_bytes
    metrics.update(_size_metrics(model, baseline_linears))  # after the speed pass: kernels' copies are made
    return {
        "model": loaded.info,
        "data": {"eval": {n: {**t.describe(), "windows": windows[n].shape[0], "seqlen": ev["seqlen"]}
                          for n, t in texts.items()}, "calib": calib_info, "tasks": task_sources},
        "metrics": metrics,
        "per_sample": per_sample,
        "kernels": kernels,  # QuantLinear layers per backend
        "speed_note": speed_note,
        "stopped_early": stopped,  # why the point's tasks were not run (adaptive evaluation), or None
        # evaluations of the text the point was calibrated on: optimistic, the report marks them
        "in_domain": calibration.in_domain(cfg["calib"]["corpus"], ev["corpora"], _task_names(ev))
        if point.needs_calibration else [],
    }


def _prepare_tasks(ev: dict[str, Any], cfg: dict[str, Any]) -> tuple[Path | None, Any, dict[str, Any]]:
    """The tasks' folder (the offline tasks generated for the seed, lm-eval's tasks over the user's benchmark
    files), its TaskManager, and where each benchmark's items came from; every task name checked."""
    if not _task_names(ev):
        return None, None, {}
    folder = Path(cfg["out_dir"]) / "tasks" / f"seed{cfg['seed']}"
    offline_tasks.write_tasks(folder, seed=cfg["seed"])
    for name, path in (ev.get("local_tasks") or {}).items():
        offline_tasks.write_local_task(folder, name, Path(path).expanduser())
    shots = ev.get("num_fewshot") or 0
    sources = {name: task_data.write_task(folder, name, Path(str(where)).expanduser(), tasks.lm_eval_yaml, shots)
               for name, where in (ev.get("task_data") or {}).items()}
    manager = tasks.task_manager(folder, only=_task_names(ev))
    tasks.check_task_names(_task_names(ev), manager)
    return folder, manager, sources


def _task_names(ev: dict[str, Any]) -> list[str]:
    names = [*(ev.get("tasks") or []), *(ev.get("task_data") or {}), *(ev.get("local_tasks") or {})]
    return list(dict.fromkeys(names))


def _task_metrics(model: nn.Module, tokenizer, ev: dict[str, Any], cfg: dict[str, Any], folder: Path,
                  manager) -> tuple[dict[str, float], dict[str, list[float]], dict[str, dict[str, Any]]]:
    """lm-eval task metrics (`task/<name>/<metric>`), each item's correctness (for paired comparisons), and what
    each task measured (items, their hash, lm-eval's task version and few-shot count)."""
    start = time.perf_counter()
    found = tasks.evaluate_tasks(model, tokenizer, _task_names(ev), folder, ev.get("task_limit"),
                                 ev.get("num_fewshot"), ev.get("task_batch_size", 16), cfg["seed"], manager)
    metrics = {f"task/{name}/{m}": v for name, r in found.items() for m, v in r["metrics"].items()}
    metrics["task_eval_s"] = time.perf_counter() - start
    items = {f"task/{name}/{m}": v for name, r in found.items() for m, v in r["items"].items()}
    info = {name: {k: r[k] for k in ("n", "items_sha256", "version", "n_shot")} for name, r in found.items()}
    return metrics, items, info


def plan_backends(point: Point, model: nn.Module) -> dict[str, str]:
    """The backend each layer will get, from the spec and the layers' shapes alone, before any work: a named
    backend that cannot serve the format or a layer's shape is refused here (UserError)."""
    spec, device = point.spec, torch.device(point.device)
    layers = {name: (quantizers.LayerFormat(m.in_features, m.out_features, spec.bits, spec.group_size, spec.sym),
                     device)
              for name, m in quantizers.arch.target_linears(model, spec.quantize_lm_head).items()}
    try:
        return quantizers.check_backend(point.backend, layers)
    except quantizers.BackendError as e:
        raise UserError(str(e)) from None


def _max_windows(ev: dict[str, Any], corpus: str) -> int | None:
    limits = ev.get("max_windows")
    return limits.get(corpus) if isinstance(limits, dict) else limits


def _corpus(cfg: dict[str, Any], name: str, part: str) -> data.CorpusText:
    """A local text that both calibrates and is evaluated is split into disjoint halves; otherwise it is whole."""
    shared = name in calibration.sources(cfg.get("calib", {}).get("corpus", "pydoc"))
    return data.load_corpus(name, cfg.get("data_dirs"), shared=shared, part=part)


def _calibration(point: Point, model: nn.Module, tokenizer) -> tuple[Tensor | None, dict[str, Any] | None]:
    if not point.needs_calibration:
        return None, None
    cfg = point.cfg
    model_key = {"model": cfg["model"], "dtype": str(point.dtype), "device": point.device}
    return calibration.calibration_set(model, tokenizer, cfg["calib"], cfg["seed"], Path(cfg["out_dir"]) / "calib",
                                       lambda name: _corpus(cfg, name, "calib"), model_key)


@dataclass
class QualityResult:
    nll_per_window: list[float]
    kl_per_token: Tensor | None  # None when this pass is the baseline itself
    top1_per_token: Tensor | None
    window_tokens: int
    reference: divergence.TopKReference | None = None

    def metrics(self, corpus: str) -> dict[str, float]:
        m = {f"ppl/{corpus}": perplexity.ppl_from_nll(self.nll_per_window)}
        if self.kl_per_token is None:  # the baseline against itself
            m.update({f"kl/{corpus}": 0.0, f"kl_p99/{corpus}": 0.0, f"top1/{corpus}": 1.0})
        else:
            m.update({f"kl/{corpus}": self.kl_per_token.mean().item(),
                      f"kl_p99/{corpus}": self.kl_per_token.quantile(0.99).item(),
                      f"top1/{corpus}": self.top1_per_token.float().mean().item()})
        return m

    def per_sample(self, corpus: str) -> dict[str, list[float]]:
        out = {f"nll/{corpus}": self.nll_per_window}
        if self.kl_per_token is not None:
            out[f"kl/{corpus}"] = self.kl_per_token.view(-1, self.window_tokens).mean(1).tolist()
            out[f"top1/{corpus}"] = self.top1_per_token.view(-1, self.window_tokens).float().mean(1).tolist()
        return out


def _quality_pass(model: nn.Module, windows: Tensor, reference: divergence.TopKReference | None,
                  topk: int, desc: str) -> QualityResult:
    """One forward per window: NLL always; KL and top-1 against `reference`, or a new reference if None."""
    nll, kl, top1, refs = [], [], [], []
    n = windows.shape[1]
    logits_iter = zip(windows, perplexity.window_logits(model, windows), strict=True)
    for i, (window, logits) in enumerate(tqdm(logits_iter, total=len(windows), desc=desc, unit="win")):
        nll.append(perplexity.token_nll(logits, window.to(logits.device)).mean().item())
        if not math.isfinite(nll[-1]):
            raise FloatingPointError(f"{desc}: window {i} has a non-finite loss ({nll[-1]}): the model's logits "
                                     f"overflow or are NaN in {logits.dtype}; try dtype=float32 or bfloat16")
        if reference is None:
            refs.append(divergence.topk_reference(logits, topk))
        else:
            ref = reference.slice(i * n, (i + 1) * n)
            kl.append(divergence.token_kl(logits, ref))
            top1.append(divergence.top1_agreement(logits, ref))
    if reference is None:
        merged = divergence.TopKReference(torch.cat([r.logprobs for r in refs]), torch.cat([r.ids for r in refs]))
        return QualityResult(nll, None, None, n, merged)
    return QualityResult(nll, torch.cat(kl), torch.cat(top1), n)


def _reference_once(path: Path, model: nn.Module, windows: dict[str, Tensor], texts: dict[str, data.TokenizedText],
                    topk: int) -> tuple[dict[str, divergence.TopKReference], dict[str, list[float]]]:
    """The baseline's reference, computed by one process of all the sweeps sharing the folder (the others wait
    for it, then read it): parallel workers never race to make it."""
    while True:
        with _claim(path.with_suffix(".lock")) as holder:
            if holder is None:
                reference, reference_nll = _load_reference(path, texts)  # made while this one waited?
                if reference is None:
                    passes = {n: _quality_pass(model, w, None, topk, f"baseline {n}") for n, w in windows.items()}
                    _save_reference(path, passes, texts)
                    reference = {n: q.reference for n, q in passes.items()}
                    reference_nll = {n: q.nll_per_window for n, q in passes.items()}
                return reference, reference_nll
        log.info("waiting for the baseline reference another worker is computing (%s)", holder)
        time.sleep(1.0)


def _load_reference(path: Path, texts: dict[str, data.TokenizedText]
                    ) -> tuple[dict[str, divergence.TopKReference] | None, dict[str, list[float]] | None]:
    """The baseline's top-k log-probabilities and NLL per window, per corpus; (None, None) if not made yet."""
    if not path.exists():
        return None, None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:  # a torn or corrupted file: torch raises many types
        log.warning("baseline reference %s is unreadable (%s: %s): recomputing it", path, type(e).__name__, e)
        return None, None
    if any(name not in saved or saved[name]["sha256"] != t.sha256 for name, t in texts.items()):
        log.warning("baseline reference %s was made on other text: recomputing it", path)
        return None, None
    return ({name: divergence.TopKReference(saved[name]["logprobs"], saved[name]["ids"]) for name in texts},
            {name: list(saved[name]["nll_per_window"]) for name in texts})


def _save_reference(path: Path, quality: dict[str, QualityResult], texts: dict[str, data.TokenizedText]) -> None:
    saved = {name: {"sha256": texts[name].sha256, "logprobs": q.reference.logprobs,
                    "ids": q.reference.ids.to(torch.int32), "nll_per_window": q.nll_per_window}
             for name, q in quality.items()}
    results.write_atomic(path, lambda f: torch.save(saved, f), binary=True)


def _size_metrics(model: nn.Module, target_names: list[str]) -> dict[str, float]:
    q = memory.quantized_layer_stats(model)
    side = q if q["layers"] else memory.linear_weight_stats(model, target_names)
    out = {"weight_bytes": memory.weight_bytes(model), "quantized_layer_bytes": side["bytes"],
           "bits_per_weight": 8 * side["bytes"] / side["weights"]}
    if q["layers"]:
        out["quantized_layer_bytes_theoretical"] = q["theoretical_bytes"]
    return out


def _decided_fail(point: Point, reference_nll: dict[str, list[float]] | None,
                  per_sample: dict[str, list[float]]) -> str | None:
    ev = point.cfg["eval"]
    if point.spec.is_baseline or not ev.get("adaptive") or not reference_nll or not _task_names(ev):
        return None
    corpora = list(reference_nll)
    reason = adaptive.decided_fail(reference_nll, {c: per_sample[f"nll/{c}"] for c in corpora},
                                   {c: per_sample[f"kl/{c}"] for c in corpora if f"kl/{c}" in per_sample},
                                   point.cfg.get("select") or {}, float(ev.get("adaptive_confidence", 0.995)))
    if reason:
        log.info("%s: beyond the bar after its windows (%s): its tasks are not run (eval.adaptive=false runs them)",
                 point.run_id, reason)
    return reason


def no_kernel_note(point: Point, kernels: dict[str, int]) -> str | None:
    """Why the speed of this point is not measured, or None: under `auto`, layers left on the reference
    (no kernel of this device serves the format) would be timed dequantizing every weight at every step,
    a property of the missing kernel, not of the format."""
    if point.backend != "auto" or not kernels.get("torch"):
        return None
    return (f"no {point.device} kernel for {point.spec.label} in {kernels['torch']} of {sum(kernels.values())} "
            "layers (they would dequantize at every step): speed not measured")


def _speed_metrics(model: nn.Module, window: Tensor, sp: dict[str, Any]) -> dict[str, float]:
    prompt = window[: sp["prompt_tokens"]]
    prefill = speed.prefill_times_s(model, prompt, sp["repeats"], sp["warmup"])
    decode = speed.decode_times_s(model, prompt, sp["decode_tokens"], sp["repeats"], sp["warmup"])
    (prefill_tok_s, prefill_spread), (decode_tok_s, decode_spread) = (
        speed.rate_and_spread(prompt.numel(), prefill), speed.rate_and_spread(sp["decode_tokens"], decode))
    return {"prefill_tok_s": prefill_tok_s, "prefill_spread_pct": prefill_spread,
            "decode_tok_s": decode_tok_s, "decode_spread_pct": decode_spread}
