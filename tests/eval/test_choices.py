"""Constrained choice: the prediction is the argmax of each label's log-likelihood as the trained reply, and the
confusion matrix in the report accounts for every scored example."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_jsonl
from tests.train.test_sft import make_config
from weitiao.errors import DataError
from weitiao.eval.choices import (candidate_tokens, choice_loglikelihoods, choice_metrics, choose,
                                  confusion_matrix)
from weitiao.eval.compare import compare_run
from weitiao.train import run

PROMPTS = [[{"role": "user", "content": "Review: a warm, funny film with a great cast. Sentiment?"}],
           [{"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": "Review: dull and far too long. Sentiment?"}],
           [{"role": "user", "content": "Short one."}],
           [{"role": "user", "content": "Earlier turn"}, {"role": "assistant", "content": "pos"},
            {"role": "user", "content": "Review: I walked out halfway through, it was that bad. Sentiment?"}]]
CHOICES = ["neg", "pos", "neutral"]  # different token counts: rows of a batch are padded


def hand_loglikelihood(model, tokenizer, prompt, choice) -> tuple[float, str]:
    """Sum of log p(token) over the reply as the chat template writes it (up to its end-of-turn marker)."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": choice}], tokenize=False)
    reply = full[len(prompt_text):].rstrip()  # the trailing newline after <|im_end|> is layout, not the reply
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + tokenizer(reply, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    total = sum(log_probs[position - 1, ids[position]].item() for position in range(len(prompt_ids), len(ids)))
    return total, reply


def test_choice_is_the_argmax_of_hand_computed_loglikelihoods(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    hand = [[hand_loglikelihood(model, tokenizer, prompt, choice) for choice in CHOICES] for prompt in PROMPTS]
    assert hand[0][1][1] == "pos<|im_end|>"  # the label and the end of turn, as training teaches them
    scores = choice_loglikelihoods(model, tokenizer, PROMPTS, CHOICES, batch_size=5)  # batches mix prompts
    for got, expected in zip(scores, hand):
        assert got == pytest.approx([value for value, _ in expected], abs=1e-3)
    chosen = choose(scores, CHOICES)
    assert chosen == [CHOICES[max(range(3), key=lambda j: row[j][0])] for row in hand]
    # only the final reply is scored, not the earlier assistant turn of the last prompt
    ids, labels = candidate_tokens(tokenizer, PROMPTS[3], "neg")
    assert tokenizer.decode([t for t in labels if t != -100]) == "neg<|im_end|>"
    # a prompt longer than max_length loses its start; the reply is still scored whole
    short_ids, short_labels = candidate_tokens(tokenizer, PROMPTS[3], "neg", max_length=12)
    assert len(short_ids) == 12 and short_labels[-len(tokenizer("neg<|im_end|>")["input_ids"]):] == \
        labels[-len(tokenizer("neg<|im_end|>")["input_ids"]):]


def test_confusion_matrix_counts_add_up():
    references = ["neg", "neg", "pos", "pos", "pos", "neutral"]
    predictions = ["neg", "pos", "pos", "pos", "neg", "neg"]
    matrix = confusion_matrix(references, predictions, CHOICES)
    assert matrix == [[1, 1, 0], [1, 2, 0], [1, 0, 0]]
    assert sum(map(sum, matrix)) == len(references)
    assert [sum(row) for row in matrix] == [references.count(c) for c in CHOICES]
    assert [sum(column) for column in zip(*matrix)] == [predictions.count(c) for c in CHOICES]
    metrics = choice_metrics(matrix)
    assert metrics["choice_accuracy"] == pytest.approx(100 * 3 / 6)
    # F1: neg 2*1/(3+2), pos 2*2/(3+3), neutral 0
    assert metrics["choice_macro_f1"] == pytest.approx(100 * (2 / 5 + 4 / 6 + 0) / 3)


@pytest.fixture
def labelled_run(tmp_path, tiny_model_dir):
    rows = [{"question": f"Review {i}: {'loved it' if i % 2 else 'hated it'}. Sentiment?",
             "answer": "pos" if i % 2 else "neg"} for i in range(24)]
    train = write_jsonl(tmp_path / "reviews.jsonl", rows)
    config = make_config(tmp_path, tiny_model_dir, train__max_steps=2, eval__generation=False,
                         eval__choices=["neg", "pos"], eval__max_examples=6, eval__batch_size=4)
    config.data.train, config.data.eval = [config.data.train[0].model_copy(update={"path": str(train)})], []
    config.data.val_size = 8
    return config, run(config)


def test_report_has_accuracy_and_a_confusion_matrix(labelled_run):
    config, result = labelled_run
    report = compare_run(result.output_dir, config)
    out = Path(result.output_dir)
    saved = json.loads((out / "report.json").read_text())
    assert saved["choices"]["labels"] == ["neg", "pos"] and saved["choice_examples"] == 6
    for model in ("base", "tuned"):
        matrix = saved["choices"][model]
        assert sum(map(sum, matrix)) == 6
        assert saved["metrics"]["choice_accuracy"][model] == pytest.approx(100 * (matrix[0][0] + matrix[1][1]) / 6)
        chosen = [sample[f"{model}_choice"] for sample in saved["samples"]]
        assert [sum(column) for column in zip(*matrix)] == [chosen.count("neg"), chosen.count("pos")]
    assert [sum(row) for row in saved["choices"]["tuned"]] == [
        [s["reference"] for s in saved["samples"]].count(label) for label in ("neg", "pos")]
    markdown = (out / "report.md").read_text()
    assert "| reference \\ choice | neg | pos | total |" in markdown and "![confusion matrices](confusion.png)" \
        in markdown
    matrix = saved["choices"]["tuned"]
    assert f"| neg | {matrix[0][0]} | {matrix[0][1]} | {sum(matrix[0])} |" in markdown
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert report["metrics"] == saved["metrics"]


def test_a_reference_that_is_not_a_choice_names_its_record(labelled_run):
    config, result = labelled_run
    config.eval.choices = ["negative", "positive"]
    with pytest.raises(DataError, match=r"reviews\.jsonl: record \d+: the reply '(neg|pos)' is not one of eval"):
        compare_run(result.output_dir, config)
