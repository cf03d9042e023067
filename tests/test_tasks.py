"""Offline tasks: generated deterministically with right answers, scored through lm-eval itself."""

import json

import pytest

from harness.offline_tasks import passages, write_tasks


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_tasks(folder, n_items=40, seed=0)
    return folder


def read(folder, name):
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def test_generation_is_deterministic_for_a_seed_and_changes_with_it(task_dir, tmp_path):
    again = write_tasks(tmp_path / "again", n_items=40, seed=0)
    other = write_tasks(tmp_path / "other", n_items=40, seed=1)
    for name, items in again.items():
        assert items == read(task_dir, name)
        assert other[name] != items


def test_generated_answers_are_right(task_dir):
    texts = passages()
    for item in read(task_dir, "qb_continuation"):
        true_ending = item["endings"][item["label"]]
        assert any(f"{item['ctx']} {true_ending}" in t for t in texts)
        assert len(set(item["endings"])) == 4
    for item in read(task_dir, "qb_lastword"):
        assert any(t.startswith(f"{item['text']} {item['target']}") for t in texts)
        assert item["target"] in item["text"].split(" ")  # recoverable from the context
    for item in read(task_dir, "qb_arithmetic"):
        a, op, b = item["question"].removeprefix("What is ").removesuffix("?").split(" ")
        answer = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert item["choices"][item["label"]] == str(answer)
        assert len(set(item["choices"])) == 4


def test_harness_scores_equal_plain_lm_eval(tiny, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from harness.metrics.tasks import evaluate_tasks

    model, tokenizer = tiny
    tasks = ["qb_continuation", "qb_lastword", "qb_arithmetic"]
    ours = evaluate_tasks(model, tokenizer, tasks, task_dir, limit=12)
    plain = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), tasks=tasks,
                            task_manager=TaskManager(include_path=str(task_dir)), limit=12)
    for task in tasks:
        assert ours[task]["n"] == 12
        assert ours[task]["metrics"]["acc"] == pytest.approx(plain["results"][task]["acc,none"])
        assert sum(ours[task]["items"]["acc"]) / 12 == pytest.approx(ours[task]["metrics"]["acc"])
        # our stderr from the items (lm-eval's own bootstrap is skipped for speed) is lm-eval's
        assert ours[task]["metrics"]["acc_stderr"] == pytest.approx(plain["results"][task]["acc_stderr,none"])
    assert ours["qb_continuation"]["metrics"]["acc_norm"] == pytest.approx(
        plain["results"]["qb_continuation"]["acc_norm,none"])


def test_unknown_task_lists_the_closest(tiny, task_dir):
    from harness.errors import UserError
    from harness.metrics.tasks import evaluate_tasks

    with pytest.raises(UserError, match="closest: qb_arithmetic"):
        evaluate_tasks(tiny[0], tiny[1], ["qb_arithmetik"], task_dir, limit=2)


def test_a_sweep_point_records_task_metrics_and_items(tmp_path):
    from conftest import run_cli

    proc = run_cli("run", "model=tiny-llama", "eval=quick", "quant=rtn", "quant.bits=4", "quant.group_size=32",
                   "eval.tasks=[qb_arithmetic,qb_lastword]", "eval.task_limit=6", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    for task in ("qb_arithmetic", "qb_lastword"):
        items = record["per_sample"][f"task/{task}/acc"]
        assert len(items) == 6 and set(items) <= {0.0, 1.0}
        assert record["metrics"][f"task/{task}/acc"] == pytest.approx(sum(items) / 6)
        assert f"task/{task}/acc_stderr" in record["metrics"]
    assert record["metrics"]["task/qb_lastword/perplexity"] > 1


LOCAL_LAYOUTS = {
    "hellaswag": lambda i: {"ctx": f"Count up: {i}, {i + 1},", "endings": [f"{i + 2}", "blue", "north", "seven"],
                            "label": 0},
    "arc": lambda i: {"question": f"What follows {i}?", "answerKey": "B",
                      "choices": {"text": ["a cat", f"{i + 1}", "the sea"], "label": ["A", "B", "C"]}},
    "piqa": lambda i: {"goal": f"Write {i} in digits", "sol1": "with letters", "sol2": f"as {i}", "label": 1},
}


@pytest.mark.parametrize("layout", sorted(LOCAL_LAYOUTS))
def test_local_file_tasks_load_and_score_in_each_layout(tiny, tmp_path, layout):
    from harness.metrics.tasks import evaluate_tasks
    from harness.offline_tasks import detect_layout, write_local_task

    path = tmp_path / f"{layout}.jsonl"
    path.write_text("".join(json.dumps(LOCAL_LAYOUTS[layout](i)) + "\n" for i in range(5)))
    assert detect_layout(path) == layout
    name = write_local_task(tmp_path / "tasks", f"local_{layout}", path)
    found = evaluate_tasks(tiny[0], tiny[1], [name], tmp_path / "tasks")[name]
    assert found["n"] == 5 and set(found["items"]["acc"]) <= {0.0, 1.0}
    assert 0 <= found["metrics"]["acc"] <= 1 and "acc_norm" in found["metrics"]


def test_a_local_file_in_no_known_layout_says_which_fields_it_expected(tmp_path):
    from harness.errors import UserError
    from harness.offline_tasks import detect_layout

    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    with pytest.raises(UserError, match=r"fields prompt, answer.*hellaswag: ctx, endings, label.*piqa: goal"):
        detect_layout(path)
