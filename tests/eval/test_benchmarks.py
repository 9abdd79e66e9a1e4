"""Multiple-choice benchmarks through lm-evaluation-harness: local layouts, errors, and agreement with the
`lm_eval` command line on the same model folder and task files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from weitiao.config import BenchmarkConfig, config_from_dict, load_config
from weitiao.errors import ConfigError, DataError
from weitiao.eval.benchmarks import BenchmarkSuite

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"


def bench(task: str, path: Path | None = None, **settings) -> BenchmarkConfig:
    return BenchmarkConfig(task=task, path=str(path) if path is not None else None, **settings)


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_tiny(folder: str):
    """conftest's tiny random llama, as compare_run would load it."""
    from transformers import AutoModelForCausalLM

    from weitiao.models import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), load_tokenizer(folder)


@pytest.fixture(scope="module")
def answering_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """conftest's tiny llama with its weights drawn ten times wider. With the usual std of 0.02 it answers D to
    every question, whatever the prompt, which would leave the command-line cross-check little to compare."""
    model, tokenizer = load_tiny(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:  # matrices and embeddings; norm weights stay at one
                parameter.normal_(std=0.2)
    folder = tmp_path_factory.mktemp("answering-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# --------------------------------------------------------------------------------------------------
# Layouts -> lm-eval task folders (no model needed)


def test_layouts_become_lm_eval_tasks(tmp_path):
    suite = BenchmarkSuite([bench("mmlu", FIXTURES / "mmlu", num_fewshot=2), bench("ceval", FIXTURES / "ceval"),
                            bench("cmmlu", FIXTURES / "cmmlu", num_fewshot=1),
                            bench("truthfulqa_mc1", FIXTURES / "truthfulqa_mc_task.json")], tmp_path)
    assert [b.lm_eval_task for b in suite.benchmarks] == ["weitiao_mmlu", "weitiao_ceval", "weitiao_cmmlu",
                                                          "weitiao_truthfulqa_mc1"]
    # lm-eval itself indexes the written folder: groups and per-subject tasks
    assert {"weitiao_mmlu", "weitiao_mmlu_astronomy", "weitiao_ceval_law", "weitiao_cmmlu_chinese_history",
            "weitiao_truthfulqa_mc1"} <= set(suite.task_manager.all_tasks)

    group = read_yaml(tmp_path / "mmlu" / "weitiao_mmlu.yaml")
    assert group["task"] == ["weitiao_mmlu_astronomy", "weitiao_mmlu_elementary_mathematics"]
    task = read_yaml(tmp_path / "mmlu" / "weitiao_mmlu_astronomy.yaml")
    assert task["num_fewshot"] == 2 and task["fewshot_split"] == "dev" and task["test_split"] == "test"
    assert task["doc_to_text"] == "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"
    assert task["description"] == "The following are multiple choice questions (with answers) about astronomy.\n\n"

    # Headerless rows keep every option as text: "None" is not a missing value, "4.5" not a float.
    maths = read_jsonl(tmp_path / "mmlu" / "elementary_mathematics_test.jsonl")
    assert maths[1] == {"question": "What is half of 9?", "A": "4", "B": "4.5", "C": "5", "D": "9", "answer": 1}
    assert maths[4]["A"] == "None" and maths[4]["answer"] == 2
    assert maths[2]["question"] == "Which number is prime: 4, 6, 7 or 9?"
    assert len(read_jsonl(tmp_path / "mmlu" / "astronomy_dev.jsonl")) == 3

    # C-Eval scores its val split (the test split has no answers); the prompt names the subject in Chinese.
    ceval = read_yaml(tmp_path / "ceval" / "weitiao_ceval_computer_network.yaml")
    assert ceval["test_split"] == "val" and ceval["num_fewshot"] == 0 and "fewshot_split" not in ceval
    assert ceval["description"] == "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
    assert ceval["doc_to_text"].endswith("答案：")
    assert read_jsonl(tmp_path / "ceval" / "computer_network_val.jsonl")[1]["answer"] == 1
    cmmlu = read_jsonl(tmp_path / "cmmlu" / "chinese_history_test.jsonl")
    assert cmmlu[1] == {"question": "郑和下西洋发生在哪个朝代？", "A": "唐朝", "B": "宋朝", "C": "元朝", "D": "明朝",
                        "answer": 3}

    # TruthfulQA: lm-eval's own task (prompt and metric) over the local questions, the true answer first.
    truthful = read_yaml(tmp_path / "truthfulqa_mc1" / "weitiao_truthfulqa_mc1.yaml")
    assert truthful["include"].endswith("truthfulqa/truthfulqa_mc1.yaml") and Path(truthful["include"]).is_file()
    questions = read_jsonl(tmp_path / "truthfulqa_mc1" / "questions.jsonl")
    assert questions[2]["mc1_targets"] == {
        "choices": ["Humans have many more than five senses, including balance and temperature", "Exactly five",
                    "Three"], "labels": [1, 0, 0]}


def test_split_and_rewrite(tmp_path):
    (tmp_path / "tasks" / "mmlu" / "stale.yaml").parent.mkdir(parents=True)
    (tmp_path / "tasks" / "mmlu" / "stale.yaml").write_text("task: weitiao_mmlu_stale\n")
    suite = BenchmarkSuite([bench("mmlu", FIXTURES / "mmlu", split="val")], tmp_path / "tasks")
    assert "weitiao_mmlu_stale" not in suite.task_manager.all_tasks
    task = read_yaml(tmp_path / "tasks" / "mmlu" / "weitiao_mmlu_astronomy.yaml")
    assert task["test_split"] == "val" and len(read_jsonl(Path(task["dataset_kwargs"]["data_files"]["val"]))) == 2


# --------------------------------------------------------------------------------------------------
# Bad input: one-line errors that name the file and field


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope: not a folder; mmlu reads a folder"):
        BenchmarkSuite([bench("mmlu", tmp_path / "nope")], tmp_path / "tasks")


def test_folder_without_the_layout(tmp_path):
    (tmp_path / "exam" / "test").mkdir(parents=True)
    (tmp_path / "exam" / "test" / "astronomy.csv").write_text("q,a,b,c,d,A\n")
    with pytest.raises(DataError, match=r"exam/test: no <subject>_test.csv files"):
        BenchmarkSuite([bench("mmlu", tmp_path / "exam")], tmp_path / "tasks")


@pytest.mark.parametrize("content, message", [("", "file is empty"), ("id,question,A,B,C,D,answer\n",
                                                                        "file has no records")])
def test_empty_split(tmp_path, content, message):
    folder = copy_fixture("ceval", tmp_path)
    (folder / "val" / "law_val.csv").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"law_val.csv: {message}"):
        BenchmarkSuite([bench("ceval", folder)], tmp_path / "tasks")


def test_missing_answer_column(tmp_path):
    # C-Eval's test split has no answer column: scoring it must say so, not fail inside lm-eval.
    with pytest.raises(DataError, match=r"computer_network_test.csv: field 'answer': no column 'answer' "
                                        r"\(the columns are: id, question, A, B, C, D\)"):
        BenchmarkSuite([bench("ceval", FIXTURES / "ceval", split="test")], tmp_path / "tasks")


def test_bad_answer_letter(tmp_path):
    folder = copy_fixture("cmmlu", tmp_path)
    (folder / "test" / "astronomy.csv").write_text(",Question,A,B,C,D,Answer\n0,问题,甲,乙,丙,丁,E\n",
                                                   encoding="utf-8")
    with pytest.raises(DataError, match=r"astronomy.csv: record 1 \(line 2\): field 'Answer': answer must be "
                                        r"one of A, B, C, D, got 'E'"):
        BenchmarkSuite([bench("cmmlu", folder)], tmp_path / "tasks")


def test_wrong_field_count(tmp_path):
    folder = copy_fixture("mmlu", tmp_path)
    (folder / "test" / "astronomy_test.csv").write_text("Q?,a,b,c,d,e,A\n")
    with pytest.raises(DataError, match=r"astronomy_test.csv: record 1 \(line 1\): row has 7 fields, expected 6"):
        BenchmarkSuite([bench("mmlu", folder)], tmp_path / "tasks")


def test_fewshot_needs_dev_questions(tmp_path):
    with pytest.raises(DataError, match=r"astronomy_dev.csv: num_fewshot is 4 but the file has 3 questions"):
        BenchmarkSuite([bench("mmlu", FIXTURES / "mmlu", num_fewshot=4)], tmp_path / "tasks")
    folder = copy_fixture("mmlu", tmp_path)
    (folder / "dev" / "astronomy_dev.csv").unlink()
    with pytest.raises(DataError, match=r"astronomy_dev.csv: num_fewshot is 1 but this few-shot file is missing"):
        BenchmarkSuite([bench("mmlu", folder, num_fewshot=1)], tmp_path / "tasks")


def test_truthfulqa_mc1_needs_one_true_answer(tmp_path):
    questions = json.loads((FIXTURES / "truthfulqa_mc_task.json").read_text())
    questions[1]["mc1_targets"]["Yes, on a clear day"] = 1
    (tmp_path / "mc_task.json").write_text(json.dumps(questions))
    with pytest.raises(DataError, match=r"mc_task.json: record 2: field 'mc1_targets': MC1 needs exactly one "
                                        r"true answer, got 2"):
        BenchmarkSuite([bench("truthfulqa_mc1", tmp_path / "mc_task.json")], tmp_path / "tasks")
    # MC2 allows several true answers
    BenchmarkSuite([bench("truthfulqa_mc2", tmp_path / "mc_task.json")], tmp_path / "tasks")


@pytest.mark.parametrize("benchmark, message", [
    ({"task": "mmlux", "path": "x"}, "task 'mmlux' cannot read local files; with `path`, task is one of mmlu, "
                                     "ceval, cmmlu, truthfulqa_mc1, truthfulqa_mc2"),
    ({"task": "truthfulqa_mc2", "path": "x", "num_fewshot": 5}, "truthfulqa_mc2: num_fewshot must be 0"),
    ({"task": "arc_easy", "split": "test"}, "arc_easy: `split` and `subjects` apply to local folders"),
    ({"task": "mmlu", "path": "x", "name": "my exam"}, "benchmark name 'my exam' may hold only"),
    ({"task": "mmlu", "path": "x", "limit": 0}, "eval.benchmarks.0.limit: Input should be greater than 0"),
    ({"task": "mmlu", "path": "x", "colour": 1}, "eval.benchmarks.0.colour: unknown key"),
])
def test_config_errors(benchmark, message):
    with pytest.raises(ConfigError) as error:
        config_from_dict({"eval": {"benchmarks": [benchmark]}})
    assert str(error.value).startswith("invalid config : eval.benchmarks.0") and message in str(error.value)


def test_config_names_and_paths(tmp_path):
    with pytest.raises(ConfigError, match="two benchmarks are named mmlu; give one of them a `name`"):
        config_from_dict({"eval": {"benchmarks": [{"task": "mmlu", "path": "a"}, {"task": "mmlu", "path": "b"}]}})
    shutil.copytree(FIXTURES / "mmlu", tmp_path / "exams" / "mmlu")
    (tmp_path / "run.yaml").write_text("eval:\n  benchmarks:\n    - {task: mmlu, path: exams/mmlu, name: school}\n"
                                       "    - hellaswag\n")
    config = load_config(tmp_path / "run.yaml")
    first, second = config.eval.benchmarks
    assert first.path == str(tmp_path / "exams" / "mmlu") and first.metric_prefix == "school"
    assert second.task == "hellaswag" and second.path is None and second.metric_prefix == "hellaswag"


@pytest.mark.parametrize("task, message", [
    ("mmlu_astronmy", r"unknown lm-eval task 'mmlu_astronmy' \(did you mean 'mmlu_astronomy'\?\); tasks that read "
                      r"local files \(with `path`\): mmlu, ceval"),
    ("truthfulqa", r"'truthfulqa' is an lm-eval tag, not a task; list its tasks as benchmarks of their own: "
                   r"truthfulqa_gen, truthfulqa_mc1, truthfulqa_mc2"),
])
def test_unknown_lm_eval_task(tmp_path, task, message):
    with pytest.raises(ConfigError, match=message):
        BenchmarkSuite([bench(task)], tmp_path)


def test_lm_eval_task_without_hub(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as on a machine without internet
    with pytest.raises(ConfigError, match=r"lm-eval task 'openbookqa' needs its dataset from the Hugging Face Hub"):
        BenchmarkSuite([bench("openbookqa")], tmp_path)


# --------------------------------------------------------------------------------------------------
# Scores


def test_same_accuracy_as_lm_eval_command_line(answering_model_dir, tmp_path):
    """weitiao's in-process scores equal `lm_eval run` on the saved model folder and the same task files."""
    suite = BenchmarkSuite([bench("mmlu", FIXTURES / "mmlu", num_fewshot=2), bench("cmmlu", FIXTURES / "cmmlu"),
                            bench("truthfulqa_mc2", FIXTURES / "truthfulqa_mc_task.json")], tmp_path / "tasks")
    model, tokenizer = load_tiny(answering_model_dir)
    ours = suite.evaluate(model, tokenizer, batch_size=8)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
               "--model_args", f"pretrained={answering_model_dir},dtype=float32", "--device", "cpu",
               "--batch_size", "8", "--include_path", str(tmp_path / "tasks"),
               "--tasks", "weitiao_mmlu,weitiao_cmmlu,weitiao_truthfulqa_mc2", "--output_path", str(tmp_path / "cli")]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    cli = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]

    assert ours["metrics"] == pytest.approx({"mmlu/acc": cli["weitiao_mmlu"]["acc,none"],
                                             "cmmlu/acc": cli["weitiao_cmmlu"]["acc,none"],
                                             "truthfulqa_mc2/acc": cli["weitiao_truthfulqa_mc2"]["acc,none"]},
                                            abs=1e-6)
    assert ours["benchmarks"]["mmlu"]["subjects"]["astronomy"]["acc"] == cli["weitiao_mmlu_astronomy"]["acc,none"]
    assert ours["benchmarks"]["mmlu"]["questions"] == 10
    assert cli["weitiao_mmlu"]["acc,none"] in {k / 10 for k in range(11)}  # 10 questions, weighted by size
    assert 0 < ours["metrics"]["truthfulqa_mc2/acc"] < 1


@pytest.mark.shared_data
def test_real_truthfulqa_file(shared_data, tiny_model_dir, tmp_path):
    source = shared_data / "truthfulqa" / "mc_task.json"
    suite = BenchmarkSuite([bench("truthfulqa_mc1", source, limit=3), bench("truthfulqa_mc2", source, limit=3)],
                           tmp_path)
    assert len(read_jsonl(tmp_path / "truthfulqa_mc2" / "questions.jsonl")) == 790
    model, tokenizer = load_tiny(tiny_model_dir)
    scores = suite.evaluate(model, tokenizer)
    assert scores["metrics"]["truthfulqa_mc1/acc"] in {0, 1 / 3, 2 / 3, 1}
    assert 0 < scores["metrics"]["truthfulqa_mc2/acc"] < 1
    assert scores["benchmarks"]["truthfulqa_mc2"]["questions"] == 3


def test_compare_run_reports_benchmarks(tiny_model_dir, tmp_path):
    """Base = the same in-process model with the adapter disabled; tuned = with it enabled; no merge."""
    from peft import LoraConfig, get_peft_model

    from weitiao.eval.compare import compare_run

    model, tokenizer = load_tiny(tiny_model_dir)
    torch.manual_seed(1)  # init_lora_weights=False: a random adapter that changes the model's answers
    adapter = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    run_dir = tmp_path / "run"
    adapter.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\n")
    benchmarks = [{"task": "mmlu", "path": str(FIXTURES / "mmlu"), "limit": 2},
                  {"task": "truthfulqa_mc2", "path": str(FIXTURES / "truthfulqa_mc_task.json"), "limit": 2}]
    config = config_from_dict({"model": {"name_or_path": str(tiny_model_dir)},
                               "data": {"train": [str(eval_file)], "eval": [str(eval_file)]},
                               "eval": {"generation": False, "benchmarks": benchmarks}})

    report = compare_run(run_dir, config)

    base_model, _ = load_tiny(tiny_model_dir)
    expected_base = BenchmarkSuite(config.eval.benchmarks, tmp_path / "check").evaluate(base_model, tokenizer, 16)
    mc2 = report["metrics"]["truthfulqa_mc2/acc"]
    assert mc2["base"] == pytest.approx(expected_base["metrics"]["truthfulqa_mc2/acc"], abs=1e-6)
    assert report["metrics"]["mmlu/acc"]["base"] == expected_base["metrics"]["mmlu/acc"]
    assert mc2["tuned"] != pytest.approx(mc2["base"], abs=1e-6)
    assert mc2["delta"] == pytest.approx(mc2["tuned"] - mc2["base"])
    assert report["benchmarks"][0]["questions"] == 4 and set(report["benchmarks"][0]["subjects"]) == {
        "astronomy", "elementary_mathematics"}
    markdown = (run_dir / "report.md").read_text()
    assert "| truthfulqa_mc2 accuracy |" in markdown and "| mmlu accuracy |" in markdown
    assert "### mmlu by subject" in markdown
    assert (run_dir / "benchmark_tasks" / "mmlu" / "weitiao_mmlu.yaml").is_file()


# --------------------------------------------------------------------------------------------------
# Subjects, minimal pairs, and benchmarks without a run folder

PAIRS = {"causative": [("Aaron breaks the glass.", "Aaron appeared the glass."),
                       ("Tina sold the car.", "Tina existed the car."),
                       ("The boy opened the door.", "The boy arrived the door.")],
         "determiner_noun_agreement_1": [("Craig explored that grocery store.", "Craig explored that grocery stores."),
                                         ("These dogs bark.", "This dogs bark."),
                                         ("Those books are old.", "That books are old."),
                                         ("This cat sleeps.", "These cat sleeps.")]}


def write_pairs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for phenomenon, pairs in PAIRS.items():
        (folder / f"{phenomenon}.jsonl").write_text("".join(
            json.dumps({"sentence_good": good, "sentence_bad": bad, "UID": phenomenon}) + "\n" for good, bad in pairs),
            encoding="utf-8")
    return folder


def test_subjects_keep_only_the_named_ones(tmp_path):
    BenchmarkSuite([bench("mmlu", FIXTURES / "mmlu", subjects=["astronomy"])], tmp_path / "tasks")
    assert read_yaml(tmp_path / "tasks" / "mmlu" / "weitiao_mmlu.yaml")["task"] == ["weitiao_mmlu_astronomy"]
    with pytest.raises(DataError, match=r"mmlu: no subject 'astronomi' here \(did you mean 'astronomy'\?\); the "
                                        r"subjects are: "):
        BenchmarkSuite([bench("mmlu", FIXTURES / "mmlu", subjects=["astronomi"])], tmp_path / "tasks2")
    with pytest.raises(ConfigError, match="truthfulqa_mc2: `subjects` applies to mmlu, ceval, cmmlu and blimp"):
        config_from_dict({"eval": {"benchmarks": [{"task": "truthfulqa_mc2", "path": "x.json", "subjects": ["a"]}]}})


def test_minimal_pairs_score_whole_sentence_likelihoods(answering_model_dir, tmp_path):
    """A pair is right when the good sentence is the more likely one: recomputed here from the model's logits."""
    from lm_eval.models.huggingface import HFLM

    folder = write_pairs(tmp_path / "blimp")
    suite = BenchmarkSuite([bench("blimp", folder)], tmp_path / "tasks")
    model, tokenizer = load_tiny(answering_model_dir)
    scores = suite.evaluate(model, tokenizer, batch_size=4)

    prefix = HFLM(pretrained=model, tokenizer=tokenizer).prefix_token_id  # what an empty context is

    def log_likelihood(sentence: str) -> float:
        # lm-eval scores a choice after its target delimiter, a space.
        ids = torch.tensor([[prefix] + tokenizer(" " + sentence, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logits = model(ids).logits.log_softmax(-1)
        return float(logits[0, :-1].gather(1, ids[0, 1:, None]).sum())

    right = {phenomenon: [log_likelihood(good) > log_likelihood(bad) for good, bad in pairs]
             for phenomenon, pairs in PAIRS.items()}
    expected = sum(map(sum, right.values())) / sum(map(len, right.values()))
    assert scores["metrics"]["blimp/acc"] == pytest.approx(expected)
    assert scores["benchmarks"]["blimp"]["questions"] == 7
    assert scores["benchmarks"]["blimp"]["subjects"]["causative"]["acc"] == pytest.approx(sum(right["causative"]) / 3)
    assert 0 < expected < 1  # the wide random model gets some pairs wrong: the check can fail

    one = BenchmarkSuite([bench("blimp", folder, subjects=["causative"])], tmp_path / "one")
    assert one.evaluate(model, tokenizer)["benchmarks"]["blimp"]["questions"] == 3


def test_minimal_pair_files_are_checked(tmp_path):
    folder = write_pairs(tmp_path / "blimp")
    (folder / "causative.jsonl").write_text('{"sentence_good": "A b.", "sentence_bad": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"causative.jsonl: record 1 \(line 1\): field 'sentence_bad': expected a "
                                        r"sentence"):
        BenchmarkSuite([bench("blimp", folder)], tmp_path / "tasks")


def test_eval_without_a_run_base_alone_and_base_vs_adapter(answering_model_dir, tmp_path):
    """`weitiao eval --model M --benchmark blimp=DIR [--adapter A]`, outside any git checkout: no run folder, one
    table, and none of git's 'fatal: not a git repository' lines that lm-eval's git lookup used to print."""
    from tests.conftest import make_lora_adapter

    folder = write_pairs(tmp_path / "blimp")
    adapter = make_lora_adapter(tmp_path / "adapter", Path(answering_model_dir))
    work = tmp_path / "work"
    work.mkdir()
    command = [sys.executable, "-m", "weitiao", "eval", "--model", answering_model_dir,
               "--benchmark", f"blimp={folder}", "--subjects", "causative,determiner_noun_agreement_1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    alone = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert "fatal" not in alone.stderr + alone.stdout
    assert alone.stdout.splitlines()[0].split() == ["metric", "score"]
    compared = subprocess.run(command + ["--adapter", str(adapter), "--output", str(tmp_path / "report")], cwd=work,
                              env=env, capture_output=True, text=True, timeout=600)
    assert compared.returncode == 0, compared.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    blimp = report["metrics"]["blimp/acc"]
    assert set(blimp) == {"base", "tuned", "delta"} and blimp["delta"] == pytest.approx(blimp["tuned"] - blimp["base"])
    assert f"{blimp['base']:.4f}" in alone.stdout  # base = the model alone
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| blimp accuracy |" in markdown and "### blimp by subject" in markdown
