"""Every recipe in examples/<name>/ runs from its config alone, shortened (the tiny model, two steps, a few eval
examples), through the base-vs-tuned report its README quotes; so recipes cannot rot."""

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from weitiao.cli import main
from weitiao.config import load_config
from weitiao.eval.compare import compare_run
from weitiao.train import run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# pt_vocab_zh is a pipeline (run.sh: data, vocabulary, then pt.yaml on their outputs), tested by tests/test_vocab.py
# and tests/train/test_pretrain.py.
RECIPES = sorted(path for path in EXAMPLES.glob("*/*.yaml") if path.parent.name != "pt_vocab_zh")
SHARED = "shared/data/"  # recipes on real public data read it from ../shared/data beside the checkout
# The metrics each recipe's README reports, besides the losses every report has.
EXPECTED = {"chat_zh/school_math": {"exact_match"}, "dialogue_summary/config": {"rouge-l", "bleu-4"},
            "sentiment/config": {"choice_accuracy", "choice_macro_f1", "exact_match"},
            "docs_qa/config": {"rouge-l"}, "adgen/lora": {"rouge-l", "bleu-4"}, "adgen/prefix": {"rouge-l", "bleu-4"},
            "text_to_sql/config": {"exact_match", "sql_execution_match", "sql_executable"},
            "gsm8k_cot/config": {"exact_match"}, "chat_zh/multiturn": set(), "dpo/sft": {"rouge-l"},
            "dpo/dpo": {"rouge-l", "pair_accuracy", "chosen_logps"}, "dpo/rm": {"pair_accuracy", "pair_margin"},
            "dpo/kto": {"rouge-l"}, "tool_calling/train": {"tool_call_accuracy", "tool_no_call_accuracy"}}


def recipe_config(path: Path, tmp_path: Path, tiny_model_dir: str, request, extra: list[str] = ()):
    """The recipe's config on the tiny model, two steps, and the first records of each of its data files (all its
    files are read and checked whole first)."""
    from weitiao.data.dataset import load_source
    from weitiao.data.readers import read_records

    if SHARED in path.read_text(encoding="utf-8"):
        shared = request.getfixturevalue("shared_data")  # skips the test when the real data is not there
        extra = [*extra, "--data.train", str(shared / path.read_text().split(SHARED, 1)[1].split()[0])]
    if "adapter:" in path.read_text(encoding="utf-8"):  # a later stage: it continues the earlier stage's run
        extra = [*extra, "--model.adapter", str(earlier_stage(tmp_path, tiny_model_dir))]
    config = load_config(path, ["--model", tiny_model_dir, "--max_steps", "2", "--output_dir", str(tmp_path / "out"),
                                "--eval_on_start", "false", "--max_examples", "3", "--max_new_tokens", "4", *extra])
    for split, count in ((config.data.train, 12), (config.data.eval, 4)):
        for index, source in enumerate(split):
            load_source(source, config.data.on_error)
            records = [record.data for _, record in zip(range(count), read_records(Path(source.path)))]
            sample = write_jsonl(tmp_path / f"{Path(source.path).stem}-{index}.jsonl", records)
            split[index] = source.model_copy(update={"path": str(sample)})
    config.data.val_size = min(config.data.val_size, 4)
    return config


def earlier_stage(tmp_path: Path, tiny_model_dir: str) -> Path:
    """A LoRA adapter on the tiny model, standing in for the earlier stage's run."""
    from tests.train.test_sft import make_config

    return Path(run(make_config(tmp_path / "earlier", tiny_model_dir, train__max_steps=1)).output_dir)


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_recipe_trains_and_reports(path, tmp_path, tiny_model_dir, request):
    config = recipe_config(path, tmp_path, tiny_model_dir, request)
    result = run(config)
    assert result.steps == 2 and result.eval_loss is not None
    report = compare_run(result.output_dir, config)
    name = f"{path.parent.name}/{path.stem}"
    losses = set() if config.stage == "rm" else {"loss", "loss_all_tokens"}  # a reward model scores, it has no loss
    assert EXPECTED[name] | losses <= set(report["metrics"]), name


def test_recipe_readmes_show_their_commands():
    for path in RECIPES:
        assert (path.parent / "README.md").is_file(), path
        readme = (path.parent / "README.md").read_text(encoding="utf-8")
        assert f"weitiao train examples/{path.parent.name}/{path.name}" in readme, path


def test_docs_qa_plain_text_and_completion_only_losses_are_comparable(tmp_path, tiny_model_dir, request):
    """The plain-text run (--train_on all) reports its loss over every token; evaluated with --train_on responses
    (`weitiao eval RUN --train_on responses`) it reports the response-token loss, as the completion-only run does."""
    path = EXAMPLES / "docs_qa" / "config.yaml"
    config = recipe_config(path, tmp_path, tiny_model_dir, request, ["--train_on", "all", "--generation", "false"])
    result = run(config)
    report = compare_run(result.output_dir, config)
    assert report["loss_tokens"] == "all"
    assert main(["eval", result.output_dir, "--train_on", "responses"]) == 0
    rescored = json.loads((Path(result.output_dir) / "report.json").read_text())
    assert rescored["loss_tokens"] == "responses"
    assert rescored["metrics"]["loss_all_tokens"] == pytest.approx(report["metrics"]["loss_all_tokens"], rel=1e-5)
    assert rescored["metrics"]["loss"]["tuned"] != report["metrics"]["loss"]["tuned"]  # fewer tokens counted
    assert "eval loss (response tokens)" in (Path(result.output_dir) / "report.md").read_text()


def test_school_math_conversion_is_reproducible(tmp_path):
    """The committed sharegpt file is what the README's `weitiao data convert` command writes."""
    folder = EXAMPLES / "chat_zh" / "data"
    out = tmp_path / "school_math_sharegpt.jsonl"
    assert main(["data", "convert", str(folder / "school_math.json"), "--to", "sharegpt", str(out)]) == 0
    assert out.read_bytes() == (folder / "school_math_sharegpt.jsonl").read_bytes()


def test_recipe_configs_read_the_public_layouts(tmp_path):
    """Each recipe's data source reads a record written as the public dataset writes it (only paths change)."""
    from weitiao.data.dataset import load_source

    public = {  # recipe config -> a record in the public file's own layout
        "dialogue_summary/config": {"id": "13818513", "summary": "Amanda baked cookies and will bring Jerry some "
                                    "tomorrow.", "dialogue": "Amanda: I baked  cookies. Do you want some?\r\nJerry: "
                                    "Sure!\r\nAmanda: I'll bring you tomorrow :-)"},
        "sentiment/config": {"text": "I rented I AM CURIOUS-YELLOW from my video store...", "label": "neg"},
        "docs_qa/config": {"instruction": "When did Virgin Australia start operating?", "context": "Virgin "
                           "Australia commenced services on 31 August 2000.", "response": "31 August 2000.",
                           "category": "closed_qa"},
        "adgen/lora": {"content": "类型#裤*版型#宽松*风格#性感*图案#线条*裤型#阔腿裤",
                       "summary": "宽松的阔腿裤这两年真的吸粉不少"},
        "text_to_sql/config": {"answer": "SELECT COUNT(*) FROM head WHERE age > 56", "question": "How many heads of "
                               "the departments are older than 56 ?", "context": "CREATE TABLE head (age INTEGER)"},
    }
    for name, record in public.items():
        config = load_config(EXAMPLES / f"{name}.yaml")
        source = config.data.train[0].model_copy(update={"path": str(write_jsonl(tmp_path / f"{len(name)}.jsonl",
                                                                                  [record]))})
        examples, _ = load_source(source)
        user, reply = examples[0].messages[-2:]
        assert reply["content"] in record.values() and user["content"], name

