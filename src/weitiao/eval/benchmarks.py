"""Multiple-choice benchmarks through lm-evaluation-harness, scored on the in-process model.

The model under test is whatever torch module the caller holds: the base model, or base + PEFT adapter
(enabled, or disabled with `disable_adapter()`), so no merge is needed. lm-eval does all the scoring.

Local files become an lm-eval task folder (an `--include_path`): per benchmark, one task YAML per
subject, a group YAML that averages the subjects weighted by their size (as lm-eval's own mmlu group
does), and the questions rewritten as JSON Lines. The questions are rewritten rather than handed to
lm-eval's csv loader because pandas reads answer texts such as "None" or "NA" as missing values and "4.5"
as a float, and because reading them here lets a bad file fail with its path, row and column. The same
folder runs from the command line: `lm_eval --model hf --model_args pretrained=DIR --include_path FOLDER
--tasks weitiao_mmlu` scores what weitiao scores.

Prompts are those of lm-eval's mmlu, ceval-valid, cmmlu and truthfulqa_mc1/mc2 tasks. TruthfulQA's local
tasks include lm-eval's own YAML, so its prompt and its MC2 metric (lm-eval's process_results_mc2) are
lm-eval's code, not a copy. BLiMP's local tasks include lm-eval's blimp template the same way: a pair counts as
right when the model gives the whole good sentence a higher log-likelihood than the bad one (accuracy per
phenomenon, and over all pairs).
"""

from __future__ import annotations

import difflib
import importlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

# The config checks the local task names at load (LOCAL_TASKS); CSV_LAYOUTS below has the layout of each CSV one.
from weitiao.config import LOCAL_BENCHMARK_TASKS as LOCAL_TASKS
from weitiao.config import MINIMAL_PAIR_TASKS, TRUTHFULQA_TASKS, BenchmarkConfig
from weitiao.data.readers import Record, read_records
from weitiao.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

CHOICES = ("A", "B", "C", "D")
FEWSHOT_SPLIT = "dev"
TASK_PREFIX = "weitiao_"
"""lm-eval names of local tasks: weitiao_<name> (the group) and weitiao_<name>_<subject>, apart from
lm-eval's own mmlu_* and truthfulqa_* tasks."""


@dataclass(frozen=True)
class CsvLayout:
    """How one benchmark family stores its questions: one CSV file per subject and split."""
    file_suffix: str
    """What follows the subject in a file name; {split} stands for the split folder's name."""
    columns: tuple[str, ...] | None
    """Column names of a file without a header row; None: the file has a header."""
    question: str
    answer: str
    """Columns of the question and of the answer letter; the options are always columns A, B, C, D."""
    eval_split: str
    answer_cue: str
    """The prompt's last line, after the options."""
    description: str
    """Text before the first question; {subject} is the subject's name."""
    subject_names: str | None = None
    """lm-eval module whose SUBJECTS maps file names to the subject names its prompts use (Chinese)."""

    def file_name(self, subject: str, split: str) -> str:
        return subject + self.file_suffix.format(split=split)

    def subjects(self, folder: Path, split: str) -> list[str]:
        suffix = self.file_suffix.format(split=split)
        return sorted(file.name[: -len(suffix)] for file in folder.glob(f"*{suffix}") if file.is_file())


CSV_LAYOUTS = {
    # Hendrycks' MMLU data: dev/astronomy_dev.csv, val/..._val.csv, test/..._test.csv; no header row.
    "mmlu": CsvLayout("_{split}.csv", ("question", *CHOICES, "answer"), "question", "answer", "test", "Answer:",
                      "The following are multiple choice questions (with answers) about {subject}.\n\n"),
    # C-Eval: the same file names, a header id,question,A,B,C,D,answer[,explanation]; test has no answers.
    "ceval": CsvLayout("_{split}.csv", None, "question", "answer", "val", "答案：",
                       "以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n",
                       "lm_eval.tasks.ceval._generate_configs"),
    # CMMLU: dev/agronomy.csv and test/agronomy.csv with the header ,Question,A,B,C,D,Answer.
    "cmmlu": CsvLayout(".csv", None, "Question", "Answer", "test", "答案：",
                       "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
                       "lm_eval.tasks.cmmlu._generate_configs"),
}


@dataclass
class Benchmark:
    """A configured benchmark, ready for lm-eval."""
    config: BenchmarkConfig
    lm_eval_task: str
    """The task or group lm-eval runs."""


class BenchmarkSuite:
    """The benchmarks of eval.benchmarks: local files are checked and written as lm-eval tasks under
    `folder` once, then `evaluate` scores any number of models on them."""

    def __init__(self, benchmarks: list[BenchmarkConfig], folder: str | Path):
        from lm_eval.tasks import TaskManager

        self.folder = Path(folder)
        self.benchmarks: list[Benchmark] = []
        for config in benchmarks:
            if config.path is None:
                self.benchmarks.append(Benchmark(config, config.task))
            else:
                self.benchmarks.append(self._write_local_task(config))
        hub_tasks = [benchmark.config for benchmark in self.benchmarks if benchmark.config.path is None]
        # Indexing lm-eval's thousands of bundled tasks takes seconds: only when one of them is asked for.
        self.task_manager = TaskManager(include_path=str(self.folder), include_defaults=bool(hub_tasks))
        for config in hub_tasks:
            self._check_hub_task(config)

    def evaluate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16
                 ) -> dict[str, Any]:
        """Scores of `model` as it is now: metrics ('mmlu/acc': 0.25, ...), per-subject scores, seconds."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        was_training = model.training
        model.eval()
        try:
            for benchmark in self.benchmarks:
                config = benchmark.config
                started = time.time()
                with _quiet_git():
                    output = simple_evaluate(
                        model=lm, tasks=[benchmark.lm_eval_task], task_manager=self.task_manager,
                        # A local task's YAML holds its num_fewshot, so the lm_eval command line needs no flag.
                        num_fewshot=config.num_fewshot if config.path is None else None,
                        limit=config.limit, bootstrap_iters=0, log_samples=False)
                scores = {task: _scores(values) for task, values in output["results"].items()}
                for metric, value in scores[benchmark.lm_eval_task].items():
                    metrics[f"{config.metric_prefix}/{metric}"] = value
                details[config.metric_prefix] = {
                    "questions": sum(count["effective"] for count in output["n-samples"].values()),
                    "seconds": round(time.time() - started, 1),
                    "subjects": {output["results"][task].get("alias", task).strip(" -"): values
                                 for task, values in scores.items() if task != benchmark.lm_eval_task},
                }
        finally:
            model.train(was_training)
        return {"metrics": metrics, "benchmarks": details}

    # -------------------------------------------------------------------------------------------------

    def _write_local_task(self, config: BenchmarkConfig) -> Benchmark:
        source = Path(config.path).expanduser()
        target = self.folder / config.metric_prefix
        if target.exists():  # written by an earlier run: stale subjects must not stay registered
            shutil.rmtree(target)
        target.mkdir(parents=True)
        if config.task in TRUTHFULQA_TASKS:
            return _write_truthfulqa_task(config, source, target)
        if config.task in MINIMAL_PAIR_TASKS:
            return _write_minimal_pair_tasks(config, source, target)
        return _write_csv_tasks(config, CSV_LAYOUTS[config.task], source, target)

    def _check_hub_task(self, config: BenchmarkConfig) -> None:
        if config.task in self.task_manager.all_tags:  # a tag's tasks are reported one by one: no single score
            tasks = sorted(self.task_manager.task_index[config.task].tags)
            raise ConfigError(f"'{config.task}' is an lm-eval tag, not a task; list its tasks as benchmarks of "
                              f"their own: {', '.join(tasks)}")
        if config.task not in self.task_manager.all_tasks:
            close = difflib.get_close_matches(config.task, self.task_manager.all_tasks, n=1)
            raise ConfigError(f"unknown lm-eval task '{config.task}'" + (f" (did you mean '{close[0]}'?)" if close
                              else "") + f"; tasks that read local files (with `path`): {', '.join(LOCAL_TASKS)}")
        try:  # builds the task, which fetches its dataset: fail now rather than after the base model's run
            self.task_manager.load([config.task])
        except ConnectionError as error:
            raise ConfigError(f"lm-eval task '{config.task}' needs its dataset from the Hugging Face Hub, which "
                              f"is not reachable ({error}); without internet use a local copy: `path` with "
                              f"task {', '.join(LOCAL_TASKS)}") from None


@contextmanager
def _quiet_git() -> Iterator[None]:
    """lm-eval records the git commit of the working folder (`git describe`); outside a git checkout git prints
    'fatal: not a git repository' on the terminal. The same lookup with git's complaint dropped."""
    import lm_eval.evaluator
    import lm_eval.loggers.utils

    def commit() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None

    modules = (lm_eval.evaluator, lm_eval.loggers.utils)
    saved = [module.get_git_commit_hash for module in modules]
    for module in modules:
        module.get_git_commit_hash = commit
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.get_git_commit_hash = original


def _chosen_subjects(config: BenchmarkConfig, found: list[str], where: Path) -> list[str]:
    """The folder's subjects, or those of `subjects` (each must exist)."""
    if config.subjects is None:
        return found
    for subject in config.subjects:
        if subject not in found:
            close = difflib.get_close_matches(subject, found, n=1)
            raise DataError(f"{config.task}: no subject '{subject}' here" + (f" (did you mean '{close[0]}'?)" if close
                            else "") + f"; the subjects are: {', '.join(found)}", path=str(where))
    return [subject for subject in found if subject in config.subjects]


def _scores(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {'acc,none': 0.3, 'acc_stderr,none': 'N/A', 'alias': ...} -> {'acc': 0.3}; a metric
    read through a filter other than 'none' keeps the filter's name: 'exact_match,strict-match'."""
    scores = {}
    for key, value in values.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        scores[metric if filter_name == "none" else key] = float(value)
    return scores


# ----------------------------------------------------------------------------------------------------
# Local CSV folders: MMLU, C-Eval, CMMLU


def _subject_names(layout: CsvLayout) -> dict[str, str]:
    if layout.subject_names is None:
        return {}
    try:
        return dict(importlib.import_module(layout.subject_names).SUBJECTS)
    except (ImportError, AttributeError):  # another lm-eval version: fall back to the file names
        return {}


def _read_questions(file: Path, layout: CsvLayout) -> list[dict[str, Any]]:
    """A subject's questions as {question, A, B, C, D, answer (0-3)}; DataError names the file, row, column."""
    questions = []
    for record in read_records(file, csv_columns=layout.columns):
        if record.number == 1:
            missing = [column for column in (layout.question, *CHOICES, layout.answer) if column not in record.data]
            if missing:
                raise DataError(f"no column '{missing[0]}' (the columns are: {', '.join(record.data)})",
                                path=str(file), field=missing[0])
        questions.append(_question(record, layout))
    return questions


def _question(record: Record, layout: CsvLayout) -> dict[str, Any]:
    row = record.data
    where = {"path": record.path, "record": record.number, "line": record.line}
    answer = (row[layout.answer] or "").strip().upper()
    if answer not in CHOICES:
        raise DataError(f"answer must be one of {', '.join(CHOICES)}, got {row[layout.answer]!r}",
                        field=layout.answer, **where)
    if not row[layout.question]:
        raise DataError("the question is empty", field=layout.question, **where)
    # An option may legitimately be empty text; the reader gives None for an empty cell.
    return {"question": row[layout.question], **{c: row[c] or "" for c in CHOICES}, "answer": CHOICES.index(answer)}


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_yaml(config: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000), encoding="utf-8")


def _write_csv_tasks(config: BenchmarkConfig, layout: CsvLayout, source: Path, target: Path) -> Benchmark:
    if not source.is_dir():
        raise DataError(f"not a folder; {config.task} reads a folder of {layout.file_suffix.format(split='SPLIT')} "
                        "files per split", path=str(source))
    split = config.split or layout.eval_split
    split_folder = source / split
    subjects = layout.subjects(split_folder, split)
    if not subjects:
        raise DataError(f"no <subject>{layout.file_suffix.format(split=split)} files (the {config.task} layout: "
                        f"{split}/<subject>{layout.file_suffix.format(split=split)})", path=str(split_folder))
    subjects = _chosen_subjects(config, subjects, split_folder)
    num_fewshot = config.num_fewshot or 0
    names = _subject_names(layout)
    group = TASK_PREFIX + config.metric_prefix
    tasks = []
    for subject in subjects:
        data_files = {split: split_folder / layout.file_name(subject, split)}
        if num_fewshot:
            data_files[FEWSHOT_SPLIT] = source / FEWSHOT_SPLIT / layout.file_name(subject, FEWSHOT_SPLIT)
            if not data_files[FEWSHOT_SPLIT].is_file():
                raise DataError(f"num_fewshot is {num_fewshot} but this few-shot file is missing",
                                path=str(data_files[FEWSHOT_SPLIT]))
        converted = {}
        for split_name, file in data_files.items():
            questions = _read_questions(file, layout)
            if split_name == FEWSHOT_SPLIT and len(questions) < num_fewshot:
                raise DataError(f"num_fewshot is {num_fewshot} but the file has {len(questions)} questions",
                                path=str(file))
            converted[split_name] = str((target / f"{subject}_{split_name}.jsonl").resolve())
            _write_jsonl(questions, Path(converted[split_name]))
        task = f"{group}_{subject}"
        task_config = {
            "task": task, "task_alias": subject,
            "dataset_path": "json", "dataset_kwargs": {"data_files": converted},
            "test_split": split, "output_type": "multiple_choice", "num_fewshot": num_fewshot,
            "description": layout.description.format(subject=names.get(subject, subject.replace("_", " "))),
            "doc_to_text": "{{question.strip()}}\n" + "".join(f"{c}. {{{{{c}}}}}\n" for c in CHOICES)
                           + layout.answer_cue,
            "doc_to_choice": list(CHOICES), "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        if num_fewshot:  # lm-eval's mmlu/ceval/cmmlu take the dev split's first questions, in file order
            task_config |= {"fewshot_split": FEWSHOT_SPLIT, "fewshot_config": {"sampler": "first_n"}}
        _write_yaml(task_config, target / f"{task}.yaml")
        tasks.append(task)
    _write_yaml({"group": group, "task": tasks,
                 "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
                 "metadata": {"version": 1.0}}, target / f"{group}.yaml")
    return Benchmark(config, group)


# ----------------------------------------------------------------------------------------------------
# TruthfulQA's mc_task.json


def _truthfulqa_targets(record: Record, field: str) -> dict[str, list]:
    """{'answer text': 0/1, ...} -> lm-eval's {'choices': [...], 'labels': [...]}, true answers first."""
    where = {"path": record.path, "record": record.number, "line": record.line, "field": field}
    targets = record.data.get(field)
    if not isinstance(targets, dict) or not targets:
        raise DataError("expected a map of answer -> 1 (true) or 0 (false)", **where)
    if any(label not in (0, 1) or isinstance(label, bool) for label in targets.values()):
        raise DataError("every answer must map to 1 (true) or 0 (false)", **where)
    true_answers = sum(targets.values())
    if field == "mc1_targets" and true_answers != 1:
        raise DataError(f"MC1 needs exactly one true answer, got {true_answers}", **where)
    if true_answers == 0:
        raise DataError("no answer is marked true (1)", **where)
    # lm-eval's truthfulqa_mc1 scores choice 0 as the right one, as in the Hub copy of this file.
    ordered = sorted(targets.items(), key=lambda item: -item[1])
    return {"choices": [answer for answer, _ in ordered], "labels": [label for _, label in ordered]}


def _write_truthfulqa_task(config: BenchmarkConfig, source: Path, target: Path) -> Benchmark:
    from lm_eval import tasks as lm_eval_tasks

    bundled = Path(lm_eval_tasks.__file__).parent / "truthfulqa" / f"{config.task}.yaml"
    if not bundled.is_file():
        raise ConfigError(f"this lm-eval install has no {bundled}, which the local {config.task} task builds on")
    if not source.is_file():
        raise DataError(f"no such file; {config.task} reads TruthfulQA's mc_task.json", path=str(source))
    field = config.task.removeprefix("truthfulqa_") + "_targets"
    rows = []
    for record in read_records(source):
        question = record.data.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError("expected the question text", path=record.path, record=record.number,
                            line=record.line, field="question")
        rows.append({"question": question, field: _truthfulqa_targets(record, field)})
    data_file = (target / "questions.jsonl").resolve()
    _write_jsonl(rows, data_file)
    task = TASK_PREFIX + config.metric_prefix
    _write_yaml({"include": str(bundled), "task": task, "tag": [],  # not in lm-eval's `truthfulqa` tag
                 "dataset_path": "json", "dataset_name": None,
                 "dataset_kwargs": {"data_files": {"validation": str(data_file)}}}, target / f"{task}.yaml")
    return Benchmark(config, task)


# ----------------------------------------------------------------------------------------------------
# BLiMP-style minimal pairs: <phenomenon>.jsonl files of {sentence_good, sentence_bad}


def _read_pairs(file: Path) -> list[dict[str, str]]:
    pairs = []
    for record in read_records(file):
        for field in ("sentence_good", "sentence_bad"):
            value = record.data.get(field)
            if not isinstance(value, str) or not value.strip():
                raise DataError("expected a sentence (a minimal pair has sentence_good and sentence_bad)",
                                path=record.path, record=record.number, line=record.line, field=field)
        pairs.append({"sentence_good": record.data["sentence_good"], "sentence_bad": record.data["sentence_bad"]})
    return pairs


def _write_minimal_pair_tasks(config: BenchmarkConfig, source: Path, target: Path) -> Benchmark:
    from lm_eval import tasks as lm_eval_tasks

    template = Path(lm_eval_tasks.__file__).parent / "blimp" / "_template_yaml"
    if not template.is_file():
        raise ConfigError(f"this lm-eval install has no {template}, which the local blimp tasks build on")
    files = sorted(source.glob("*.jsonl")) if source.is_dir() else [source] if source.is_file() else []
    if not files:
        raise DataError("no <phenomenon>.jsonl files of sentence_good / sentence_bad pairs", path=str(source))
    chosen = _chosen_subjects(config, [file.stem for file in files], source)
    group = TASK_PREFIX + config.metric_prefix
    tasks = []
    for file in files:
        if file.stem not in chosen:
            continue
        data_file = (target / f"{file.stem}.jsonl").resolve()
        _write_jsonl(_read_pairs(file), data_file)
        task = f"{group}_{file.stem}"
        _write_yaml({"include": str(template), "task": task, "task_alias": file.stem, "tag": [],
                     "dataset_path": "json", "dataset_name": None,
                     "dataset_kwargs": {"data_files": {"train": str(data_file)}}}, target / f"{task}.yaml")
        tasks.append(task)
    # Over all pairs, as BLiMP's paper reports its overall accuracy.
    _write_yaml({"group": group, "task": tasks,
                 "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
                 "metadata": {"version": 1.0}}, target / f"{group}.yaml")
    return Benchmark(config, group)
