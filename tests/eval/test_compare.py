"""Base vs tuned: the numbers of the saved run equal those of the model in memory, and the report says them."""

import json
import re
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.train.test_sft import make_config
from weitiao.errors import DataError
from weitiao.eval.compare import compare_run, evaluate_model
from weitiao.eval.report import format_table, metric_rows
from weitiao.train import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("compare")
    config = make_config(tmp, tiny_model_dir, train__max_steps=6, eval__extractor="json", eval__max_new_tokens=8,
                         eval__batch_size=4)
    return config, run(config)


def test_in_memory_and_saved_adapter_give_the_same_numbers(trained):
    from weitiao.data.dataset import build_datasets
    from weitiao.models import load_tokenizer

    config, result = trained
    report = compare_run(result.output_dir, config)
    tokenizer = load_tokenizer(result.output_dir)
    _, eval_set, _ = build_datasets(config.data, tokenizer, config.stage, config.train.seed)
    in_memory = evaluate_model(result.model.eval(), tokenizer, eval_set, config, "in memory")
    assert set(in_memory["metrics"]) == set(report["metrics"])
    for name, value in in_memory["metrics"].items():
        assert report["metrics"][name]["tuned"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert report["samples"][0]["tuned"] == in_memory["predictions"][0]
    # the adapter changed the model: base and tuned losses differ, and the change is their difference
    loss = report["metrics"]["loss"]
    assert loss["base"] != loss["tuned"] and loss["delta"] == pytest.approx(loss["tuned"] - loss["base"])


def test_report_files_say_the_same_numbers(trained):
    config, result = trained
    report = compare_run(result.output_dir, config)
    out = Path(result.output_dir)
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"] == report["metrics"]
    markdown = (out / "report.md").read_text()
    for label, base, tuned, change in metric_rows(saved):
        assert f"| {label} | {base} | {tuned} | {change} |" in markdown
    for png in ("loss_curves.png", "metrics.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and set(lines[0]) == {"prompt", "reference", "base", "tuned"}
    assert re.search(r"exact match %\s+\d", format_table(saved))


def test_prompt_learning_adapter_is_compared_with_its_base(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, method="prefix", train__max_steps=2, eval__generation=False)
    result = run(config)
    report = compare_run(result.output_dir, config)
    # With the prefix disabled the model is the plain base (the run's own "before" loss already had an untrained
    # prefix attached), and with it enabled it is what the run trained.
    from transformers import AutoModelForCausalLM

    from weitiao.data.dataset import build_datasets
    from weitiao.models import load_tokenizer

    tokenizer = load_tokenizer(result.output_dir)
    _, eval_set, _ = build_datasets(config.data, tokenizer, config.stage, config.train.seed)
    base = evaluate_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, eval_set, config)
    assert report["metrics"]["loss"]["base"] == pytest.approx(base["metrics"]["loss"], rel=1e-5)
    assert report["metrics"]["loss"]["tuned"] == pytest.approx(result.eval_loss, rel=1e-5)


def test_no_eval_split_is_a_clear_error(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, train__max_steps=1)
    config.data.eval = []
    result = run(config)
    with pytest.raises(DataError, match="no evaluation data: set data.eval or data.val_size"):
        compare_run(result.output_dir, config)


def test_generation_stops_at_the_end_marker_of_a_custom_template():
    from weitiao.config import CustomTemplate, DataConfig
    from weitiao.data.templates import template_stops

    dialogue = DataConfig(custom_template=CustomTemplate(user="### Instruction:\n{content}\n\n### Output:\n",
                                                         assistant="{content}\n\n### End{eos}"))
    assert template_stops(dialogue) == ["### End"]
    assert template_stops(DataConfig(custom_template=CustomTemplate())) == []  # {content}{eos}: EOS alone
    assert template_stops(DataConfig(template="dolly")) == ["### End"]
    assert template_stops(DataConfig(template="qa")) == []


def test_loss_label_says_which_tokens_were_scored():
    values = {"base": 2.0, "tuned": 1.0, "delta": -1.0}
    report = {"metrics": {"loss": values, "loss_all_tokens": values}, "loss_tokens": "all"}
    assert [row[0] for row in metric_rows(report)] == ["eval loss (trained tokens: all)", "eval loss (all tokens)"]
    report["loss_tokens"] = "responses"
    assert metric_rows(report)[0][0] == "eval loss (response tokens)"


def test_report_header_counts_what_of_the_eval_data_was_not_scored(tmp_path, tiny_model_dir):
    """Truncation that leaves an eval example no reply, an eval source cut to a share by its weight, and several
    references: each is said in report.md and above the terminal table."""
    rows = [{"question": f"q{i}", "answer": f"short {i}", "answer2": f"other {i}"} for i in range(4)]
    rows.append({"question": "long " * 200, "answer": "lost", "answer2": "lost too"})  # the prompt fills max_length
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"question": f"e{i}", "answer": f"e {i}"} for i in range(10)])
    sources = [{"path": str(test), "columns": {"prompt": "question", "response": ["answer", "answer2"]}},
               {"path": str(extra), "weight": 0.5}]
    config = make_config(tmp_path, tiny_model_dir, train__max_steps=1, data__eval=sources,
                         eval__max_new_tokens=4)
    result = run(config)
    report = compare_run(result.output_dir, config)
    data = report["eval_data"]
    assert report["eval_examples"] == 4 + 5 and data["examples_in"] == 5 + 5
    assert data["dropped"] == {"dropped: no response tokens left after truncation": 1}
    assert data["subsets"] == [{"path": str(extra), "weight": 0.5, "records": 10, "used": 5}]
    assert data["references_per_example"] == 2
    markdown = (Path(result.output_dir) / "report.md").read_text()
    notes = ["1 of 10 eval examples not scored (1 dropped: no response tokens left after truncation; data.max_length "
             "128)", f"{extra}: a seeded random 0.5 of it (5 of 10 records; its weight)",
             "2 references per example on average: exact match on any, ROUGE the best F1 over them, BLEU "
             "multi-reference"]
    table = format_table(report)
    for note in notes:
        assert f"- {note}" in markdown and f"note: {note}" in table
