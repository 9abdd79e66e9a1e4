"""The noisy-pool benchmark's data (bench/noisy_pool_data.py): each injected fault is what its label says, at the
rate it says, a duplicate comes after its original, and no held-out prompt overlaps the pool."""

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from weitiao.data.clean import normalise, visible  # noqa: E402


def test_pool_faults_are_labelled_truthfully(tmp_path, shared_data):
    import noisy_pool_data

    built = noisy_pool_data.build(shared_data, tmp_path, scale=0.2, heldout=20)
    pool = [json.loads(line) for line in (tmp_path / "pool.jsonl").read_text(encoding="utf-8").splitlines()]
    labels = [json.loads(line) for line in (tmp_path / "pool.labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in pool] == [label["id"] for label in labels] and len(pool) == built["records"]
    # Rates are of the clean records before faults; the wrong-language replacements whose answers carry the same
    # language as the right one (code, "D") are right answers, labelled clean.
    before = built["clean"] + sum(
        n for f, n in built["faults"].items() if f not in ("exact_duplicate", "near_duplicate"))
    for fault, rate in noisy_pool_data.FAULTS.items():
        extra = built["replaced_without_fault"] if fault == "wrong_language" else 0
        assert built["faults"][fault] + extra == round(rate * before), fault
    by_id = {r["id"]: r for r in pool}
    position = {r["id"]: i for i, r in enumerate(pool)}
    reply = lambda r: r["conversations"][-1]["value"]  # noqa: E731
    for label in labels:
        record = by_id[label["id"]]
        if label["fault"] in ("exact_duplicate", "near_duplicate"):
            original = by_id[label["detail"].removeprefix("copy of ")]
            assert position[original["id"]] < position[label["id"]]  # clean keeps the first occurrence
            assert original["conversations"][:-1] == record["conversations"][:-1]
            same = normalise(reply(original)) == normalise(reply(record))
            assert same == (label["fault"] == "exact_duplicate")
        elif label["fault"] == "empty_or_one_word":
            assert len(visible(reply(record)).split()) <= 1 and len(visible(reply(record))) <= 5
        elif label["fault"] == "wrong_language":  # Chinese characters in the reply exactly when the prompt is English
            chinese_reply = bool(noisy_pool_data._CJK.search(reply(record)))
            assert chinese_reply == label["detail"].startswith("en prompt") != \
                bool(noisy_pool_data._CJK.search(record["conversations"][0]["value"]))
        elif label["fault"] == "boilerplate":
            assert any(line in reply(record) for line in noisy_pool_data.BOILERPLATE["en"]
                       + noisy_pool_data.BOILERPLATE["zh"])
    assert Counter(label["task"] for label in labels) == built["tasks"]
    for task, check in built["overlap"]["tasks"].items():
        assert check["largest_overlap_kept"] <= 0.5
        heldout = (tmp_path / "heldout" / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(heldout) == check["kept"] > 0


def test_clean_finds_the_injected_faults_it_is_built_for(tmp_path, shared_data):
    """`data clean`'s text rules (no model) against the labels of a small pool: recall and precision have floors a
    little under what they measure (here 81.6% / 86.2%; full pool 82.5% / 85.7%, docs/data-selection.md), and
    each fault a rule exists for is found nearly completely."""
    import noisy_pool
    import noisy_pool_data

    from weitiao.config import CleanConfig, DataSource
    from weitiao.data.clean import clean_examples

    noisy_pool_data.build(shared_data, tmp_path, scale=0.5, heldout=10)
    labels = {json.loads(line)["id"]: json.loads(line)
              for line in (tmp_path / "pool.labels.jsonl").read_text(encoding="utf-8").splitlines()}
    result = clean_examples(DataSource(path=str(tmp_path / "pool.jsonl")),
                            CleanConfig(language="auto", truncated_sentence=True))
    found = noisy_pool.detection({item.original["id"]: item.rule for item in result.removed}, labels)
    print(found)
    assert found["recall"] >= 0.79 and found["precision"] >= 0.84
    share = {fault: int(caught) / int(injected)
             for fault, (caught, injected) in ((f, v.split("/")) for f, v in found["recall_by_fault"].items())}
    assert min(share[f] for f in ("exact_duplicate", "refusal", "boilerplate")) == 1.0
    assert share["near_duplicate"] >= 0.97 and share["empty_or_one_word"] >= 0.85 and share["wrong_language"] >= 0.85


def test_generation_faults_counts_the_answers_that_show_an_injected_fault():
    """The benchmark's behaviour measure: a refusal, an English answer to a Chinese prompt and a pool footer count,
    each once, under its rule; a right answer, a short English label and a number do not."""
    import noisy_pool
    import noisy_pool_data

    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    footer = noisy_pool_data.BOILERPLATE["zh"][1]
    saved = {"prompts": [user("写一首关于春天的诗。"), user("把这句话翻译成英文：你好"),
                         user("Classify the sentiment: I love it."), user("What is 6 times 7?"),
                         user("列出三种水果。"), user("How do I boil an egg?"), user("介绍一下长城。")],
             "predictions": ["春风吹过田野，花开满山坡，燕子归来。", "Hello", "Positive", "42",
                             "Here are three fruits: apples, bananas and oranges.",
                             "I'm sorry, but I can't help with that request.",
                             "长城是中国古代的军事防御工程，全长两万多公里。\n\n" + footer]}
    faults = noisy_pool.generation_faults({"predictions": {"mixed": saved}})
    assert faults == {"answers": 7, "faulty": 3, "share": round(3 / 7, 4),
                      "by_rule": {"language": 1, "refusal": 1, "boilerplate": 1}}
    assert noisy_pool.generation_faults({"predictions": {"old": {"predictions": ["x"], "references": ["y"]}}}) is None


def test_answers_of_a_saved_row_come_from_its_own_adapter(tmp_path, tokenizer):
    """--stages generate: a row trained without answers gets the greedy answers of the model it trained (its saved
    adapter on the base model), not the base model's; its held-out loss is kept as it was."""
    import argparse

    import noisy_pool
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_lora_adapter, make_tiny_model

    base = make_tiny_model(tmp_path / "base", tokenizer, weight_std=0.5)
    make_lora_adapter(tmp_path / "work" / "runs" / "random-0.1-1", base)
    heldout = tmp_path / "math_en.jsonl"
    pairs = [("What is 2 + 3?", "#### 5"), ("What is 4 times 6?", "#### 24")]
    heldout.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": q},
                                                             {"from": "gpt", "value": a}]}) + "\n" for q, a in pairs))
    args = argparse.Namespace(model=str(base), gen_count=2, generation=True)
    row = {"name": "random", "ratio": 0.1, "seed": 1, "response_loss": 9.87, "predictions": {}}

    answered = noisy_pool.answer_saved_row(row, tmp_path / "work", {"math_en": heldout}, args)

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "work" / "runs" /
                                                                           "random-0.1-1"))
    expected = noisy_pool.answer(tuned.eval(), tokenizer, {"math_en": heldout}, args)["predictions"]["math_en"]
    base_answers = noisy_pool.answer(AutoModelForCausalLM.from_pretrained(base).eval(), tokenizer,
                                     {"math_en": heldout}, args)["predictions"]["math_en"]["predictions"]
    assert answered["predictions"]["math_en"]["predictions"] == expected["predictions"]
    assert answered["predictions"]["math_en"]["predictions"] != base_answers
    assert answered["response_loss"] == 9.87 and answered["exact_match"] == 0.0
    assert answered["generation_faults"]["answers"] == 2
