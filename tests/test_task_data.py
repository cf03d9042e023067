"""Benchmark files in their authors' layouts, scored through lm-eval's own task definitions: per layout,
hand-made items in that layout go through the harness, and the rows lm-eval's task reads (written out by
hand here) go through `lm_eval.simple_evaluate` with a task YAML of this test's own; equal item by item."""

import json

import pytest

from harness import task_data
from harness.errors import UserError
from harness.metrics import tasks


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


ARC_AI2 = [
    {"id": "Q1", "question": {"stem": "Which gas do plants take in for photosynthesis?",
                              "choices": [{"text": "oxygen", "label": "A"}, {"text": "carbon dioxide", "label": "B"},
                                          {"text": "helium", "label": "C"}, {"text": "neon", "label": "D"}]},
     "answerKey": "B"},
    {"id": "Q2", "question": {"stem": "What melts ice fastest?",
                              "choices": [{"text": "salt", "label": "1"}, {"text": "sand", "label": "2"},
                                          {"text": "shade", "label": "3"}]},
     "answerKey": "1"},
    {"id": "Q3", "question": {"stem": "A compass needle points to",
                              "choices": [{"text": "the sun", "label": "A"}, {"text": "magnetic north", "label": "B"},
                                          {"text": "the moon", "label": "C"}, {"text": "east", "label": "D"}]},
     "answerKey": "B"},
]
ARC_HF = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
           "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                       "label": [c["label"] for c in r["question"]["choices"]]}} for r in ARC_AI2]
PIQA_ITEMS = [{"goal": "To open a jar lid that is stuck,", "sol1": "run it under hot water.", "sol2": "put it in ice."},
              {"goal": "Keep bread fresh", "sol1": "leave it in the sun", "sol2": "store it in a sealed bag"},
              {"goal": "Dry wet shoes", "sol1": "stuff them with newspaper", "sol2": "fill them with water"}]
PIQA_LABELS = ["0", "1", "0"]
HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the "
     "window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "ctx": "Then, the man ... then",
     "split": "val", "split_type": "indomain", "label": 3, "source_id": "activitynet~v_-1IBHYS3L-Y",
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."]},
    {"ind": 9, "activity_label": "Baking cookies", "ctx_a": "[header] How to bake cookies [title] Preheat the oven.",
     "ctx_b": "you", "ctx": "...", "split": "val", "split_type": "zeroshot", "label": 0, "source_id": "wikihow~1",
     "endings": ["mix the dough [step] and chill it.", "paint the oven.", "sell the flour.",
                 "open a window [title] x"]},
]
WINOGRANDE = [{"qID": "a-1", "sentence": "The trophy doesn't fit into the suitcase because the _ is too large.",
               "option1": "trophy", "option2": "suitcase", "answer": "1"},
              {"qID": "a-2", "sentence": "The trophy doesn't fit into the suitcase because the _ is too small.",
               "option1": "trophy", "option2": "suitcase", "answer": "2"}]
LAMBADA = [{"text": "She opened the door and saw her old friend standing there. She smiled at her friend"},
           {"text": "The cat chased the mouse around the house until the mouse hid under the bed from the cat"}]
BOOLQ = [{"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky appears blue by day."},
         {"question": "do fish fly", "title": "Fish", "answer": False, "passage": "Most fish swim; few glide."}]
MMLU_ROWS = {"abstract_algebra": [["Find the order of 2 in Z_5.", "2", "4", "5", "1", "B"],
                                  ["Is Z_4 a field?", "Yes", "No", "Only mod 2", "Sometimes", "B"]],
             "anatomy": [["Which bone is in the thigh?", "femur", "tibia", "ulna", "radius", "A"]]}


def mmlu_hf(subject):
    return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans)}
            for q, a, b, c, d, ans in MMLU_ROWS[subject]]


# task, files in the authors' layout {name: text}, the file (or folder) named, the rows lm-eval reads, layout
CASES = [
    ("arc_easy", {"ARC-Easy-Test.jsonl": jsonl(ARC_AI2)}, "ARC-Easy-Test.jsonl", ARC_HF, "AI2 ARC jsonl"),
    ("arc_challenge", {"test.jsonl": jsonl(ARC_HF)}, "test.jsonl", ARC_HF, "HF ai2_arc"),
    ("piqa", {"valid.jsonl": jsonl(PIQA_ITEMS), "valid-labels.lst": "\n".join(PIQA_LABELS) + "\n"}, ".",
     [{**r, "label": int(v)} for r, v in zip(PIQA_ITEMS, PIQA_LABELS, strict=True)], "PIQA jsonl + labels file"),
    ("hellaswag", {"hellaswag_val.jsonl": jsonl(HELLASWAG)}, "hellaswag_val.jsonl",
     [{**r, "label": str(r["label"])} for r in HELLASWAG], "HellaSwag jsonl (authors' or HF)"),
    ("winogrande", {"dev.jsonl": jsonl([{k: v for k, v in r.items() if k != "answer"} for r in WINOGRANDE]),
                    "dev-labels.lst": "1\n2\n"}, "dev.jsonl",
     [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in WINOGRANDE],
     "WinoGrande jsonl (+ labels file) or HF"),
    ("lambada_openai", {"lambada_test.jsonl": jsonl(LAMBADA)}, "lambada_test.jsonl", LAMBADA,
     "LAMBADA OpenAI jsonl or HF"),
    ("boolq", {"dev.jsonl": jsonl(BOOLQ)}, "dev.jsonl",
     [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
      for i, r in enumerate(BOOLQ)], "BoolQ jsonl (authors' or HF google/boolq)"),
]


def write_files(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def score_directly(model, tokenizer, folder, task, rows_by_split, eval_split):
    """lm-eval on its own: a YAML that includes lm-eval's task and reads the given rows."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in rows_by_split.items():
        (folder / f"{split}.jsonl").write_text(jsonl(rows))
        files[split] = str(folder / f"{split}.jsonl")
    splits = {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    splits["test_split" if eval_split == "test" else "validation_split"] = eval_split
    if "dev" in files:
        splits["fewshot_split"] = "dev"
    (folder / f"{task}.yaml").write_text(json.dumps({
        "include": str(tasks.lm_eval_yaml(task)), "task": task, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": files}, **splits}))
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=[task],
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                          log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return {m: [float(s[m]) for s in samples] for m in ("acc", "acc_norm") if m in samples[0]}, samples


def score_through_the_harness(model, tokenizer, folder, task, where):
    info = task_data.write_task(folder, task, where, tasks.lm_eval_yaml)
    manager = tasks.task_manager(folder, only=[task])
    return info, tasks.evaluate_tasks(model, tokenizer, [task], folder, manager=manager)[task]


@pytest.mark.parametrize("task, files, named, rows, layout", CASES, ids=[c[0] for c in CASES])
def test_a_benchmark_file_in_its_authors_layout_scores_as_lm_eval_does(tiny, tmp_path, task, files, named, rows,
                                                                        layout):
    model, tokenizer = tiny
    write_files(tmp_path / "data", files)
    converted, found_layout = task_data.convert(task, task_data.pick_file(task, tmp_path / "data" / named,
                                                                          task_data.evaluated_split(
                                                                              tasks.lm_eval_yaml(task))))
    assert converted == rows and found_layout == layout
    info, ours = score_through_the_harness(model, tokenizer, tmp_path / "tasks", task, tmp_path / "data" / named)
    split = info["split"]
    direct, samples = score_directly(model, tokenizer, tmp_path / "direct", task, {split: rows}, split)
    assert info["layout"] == layout and info["items"] == ours["n"] == len(rows)
    assert ours["items"] == direct
    assert ours["items_sha256"] and ours["version"] is not None and ours["n_shot"] == 0
    for metric, values in direct.items():
        assert ours["metrics"][metric] == pytest.approx(sum(values) / len(values))


def test_mmlu_from_its_authors_csv_folders_is_its_subjects_and_their_item_weighted_mean(tiny, tmp_path):
    model, tokenizer = tiny
    data = tmp_path / "mmlu" / "data"
    for subject, rows in MMLU_ROWS.items():
        write_files(data / "test", {f"{subject}_test.csv": "".join(",".join(f'"{c}"' for c in r) + "\n" for r in rows)})
        write_files(data / "dev", {f"{subject}_dev.csv": f'"dev q of {subject}","a","b","c","d","C"\n'})
    info, ours = score_through_the_harness(model, tokenizer, tmp_path / "tasks", "mmlu", tmp_path / "mmlu")
    assert info["subjects"] == 2 and ours["n"] == 3
    direct = []
    for subject in sorted(MMLU_ROWS):
        dev = [{"question": f"dev q of {subject}", "subject": subject, "choices": ["a", "b", "c", "d"], "answer": 2}]
        items, _ = score_directly(model, tokenizer, tmp_path / f"direct-{subject}", f"mmlu_{subject}",
                                  {"test": mmlu_hf(subject), "dev": dev}, "test")
        direct += items["acc"]
    assert ours["items"]["acc"] == direct
    assert ours["metrics"]["acc"] == pytest.approx(sum(direct) / len(direct))


def test_a_file_in_no_known_layout_gets_one_line_naming_the_layouts(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(jsonl([{"prompt": "x", "answer": "y"}]))
    with pytest.raises(UserError, match=r"fields prompt, answer, which match no layout of arc. Expected: AI2 ARC "
                                        r"jsonl \(question.stem, question.choices, answerKey\) or HF ai2_arc") as e:
        task_data.convert("arc_easy", path)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no known file layout for the task 'sciq'"):
        task_data.convert("sciq", path)


def test_labels_that_do_not_align_with_the_items_are_refused(tmp_path):
    write_files(tmp_path, {"valid.jsonl": jsonl(PIQA_ITEMS), "valid-labels.lst": "0\n1\n"})
    with pytest.raises(UserError, match="2 labels for 3 items"):
        task_data.convert("piqa", tmp_path / "valid.jsonl")


def test_a_folder_with_several_files_picks_the_evaluated_split_or_asks(tmp_path):
    write_files(tmp_path, {"train.jsonl": "", "valid.jsonl": "", "valid-labels.lst": "", "test.jsonl": ""})
    assert task_data.pick_file("piqa", tmp_path, "validation").name == "valid.jsonl"
    assert task_data.pick_file("arc_easy", tmp_path, "test").name == "test.jsonl"
    write_files(tmp_path, {"val2.jsonl": ""})
    with pytest.raises(UserError, match="cannot tell which file"):
        task_data.pick_file("piqa", tmp_path, "validation")


def test_a_sweep_point_scores_a_benchmark_file_and_evaluates_a_local_text_whole(tmp_path):
    from conftest import run_cli

    write_files(tmp_path, {"ARC-Easy-Test.jsonl": jsonl(ARC_AI2)})
    text = "".join(f" = Section {i} = \n\n The value of item {i} is {i * 7} . \n" for i in range(300))
    (tmp_path / "wiki.valid.raw").write_text(text)
    proc = run_cli("run", "model=tiny-llama", "eval=quick", "quant=fp16", f"out_dir={tmp_path / 'out'}",
                   "eval.tasks=[]", f"eval.task_data={{arc_easy: {tmp_path / 'ARC-Easy-Test.jsonl'}}}",
                   "eval.corpora=[wikitext2:valid]", f"data_dirs.wikitext2={tmp_path}", "eval.max_windows=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")]
    arc = record["data"]["tasks"]["arc_easy"]
    assert arc["layout"] == "AI2 ARC jsonl" and arc["items"] == arc["n"] == 3 and len(arc["items_sha256"]) == 64
    assert len(record["per_sample"]["task/arc_easy/acc_norm"]) == 3
    whole = record["data"]["eval"]["wikitext2:valid"]
    assert whole["windows"] == whole["tokens"] // 256 and whole["tokens"] >= len(text.encode()) // 2


def test_mmlu_rows_in_the_hf_layout_are_split_into_their_subjects(tmp_path):
    write_files(tmp_path, {"mmlu.jsonl": jsonl(mmlu_hf("anatomy") + mmlu_hf("abstract_algebra"))})
    info = task_data.write_task(tmp_path / "tasks", "mmlu", tmp_path / "mmlu.jsonl", tasks.lm_eval_yaml)
    assert info["subjects"] == 2 and info["layout"] == "HF cais/mmlu"
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "mmlu_abstract_algebra.test.jsonl").open()]
    assert rows == mmlu_hf("abstract_algebra")


def test_a_folder_of_jsonl_and_csv_copies_picks_the_jsonl(tmp_path):
    write_files(tmp_path, {"ARC-Easy-Test.jsonl": "", "ARC-Easy-Test.csv": "", "ARC-Easy-Dev.jsonl": ""})
    assert task_data.pick_file("arc_easy", tmp_path, "test").name == "ARC-Easy-Test.jsonl"


def test_few_shot_examples_come_from_the_training_file_as_in_lm_evals_task(tmp_path):
    write_files(tmp_path / "arc", {"ARC-Easy-Test.jsonl": jsonl(ARC_AI2), "ARC-Easy-Train.jsonl": jsonl(ARC_AI2[:2])})
    info = task_data.write_task(tmp_path / "tasks", "arc_easy", tmp_path / "arc", tasks.lm_eval_yaml, shots=1)
    config = json.loads((tmp_path / "tasks" / "arc_easy.yaml").read_text())
    assert config["training_split"] == "train" and info["shots_from"].endswith("ARC-Easy-Train.jsonl")
    write_files(tmp_path / "only", {"ARC-Easy-Test.jsonl": jsonl(ARC_AI2)})
    with pytest.raises(UserError, match="few-shot examples come from its training split"):
        task_data.write_task(tmp_path / "t2", "arc_easy", tmp_path / "only", tasks.lm_eval_yaml, shots=1)


def test_mmlus_authors_folder_reads_only_its_test_and_dev_files(tmp_path):
    data = tmp_path / "data"
    write_files(data / "test", {"anatomy_test.csv": '"q","a","b","c","d","A"\n'})
    write_files(data / "auxiliary_train", {"mc_test.csv": '"q","a","b","c","d","A"\n'})
    assert set(task_data.mmlu_files(data)) == {"anatomy"}
