import math

import pytest

from weitiao.eval.metrics import bleu4, exact_match, generation_metrics, json_scores, make_extractor, rouge

ENGLISH = [("the cat sat on the mat", "the cat is sitting on the mat"),
           ("a quick brown fox jumps", "the quick brown fox jumped over the dog"),
           ("nothing in common", "completely different words here")]


def test_rouge_equals_rouge_score_on_english():
    from rouge_score import rouge_scorer

    predictions, references = zip(*ENGLISH)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {key: 100 * sum(scorer.score(r, p)[key].fmeasure for p, r in ENGLISH) / len(ENGLISH)
                for key in ("rouge1", "rouge2", "rougeL")}
    got = rouge(predictions, references)
    assert got["rouge-1"] == pytest.approx(expected["rouge1"])
    assert got["rouge-2"] == pytest.approx(expected["rouge2"])
    assert got["rouge-l"] == pytest.approx(expected["rougeL"])
    assert 0 < got["rouge-2"] < got["rouge-1"] < 100


def test_bleu_equals_sacrebleu_on_english():
    import sacrebleu

    predictions, references = zip(*ENGLISH)
    expected = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    assert bleu4(predictions, references) == pytest.approx(expected) and expected > 0


def test_chinese_scores_are_segmented_and_hand_checkable():
    # jieba: 我/喜欢/吃/苹果 vs 我/喜欢/吃/香蕉 -> 3 of 4 words shared, 2 of 3 bigrams, LCS 3.
    scores = rouge(["我喜欢吃苹果"], ["我喜欢吃香蕉"])
    assert scores["rouge-1"] == pytest.approx(75.0)
    assert scores["rouge-2"] == pytest.approx(200 / 3)
    assert scores["rouge-l"] == pytest.approx(75.0)
    # sacrebleu zh splits Chinese into characters: n-gram precisions 4/6, 3/5, 2/4, 1/3, no brevity penalty.
    assert bleu4(["我喜欢吃苹果"], ["我喜欢吃香蕉"]) == pytest.approx(100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # rouge-score alone would see no tokens at all in Chinese text
    from rouge_score import rouge_scorer

    assert rouge_scorer.RougeScorer(["rouge1"]).score("我喜欢吃香蕉", "我喜欢吃苹果")["rouge1"].fmeasure == 0


@pytest.mark.parametrize("extractor, text, expected", [
    ("last_number", "It costs 1,234 dollars.", "1234"),
    ("last_number", "From 3 we subtract 8 to get -5", "-5"),
    ("last_number", "The answer is 42. Hope that helps!", "42"),
    ("last_number", "3.50", "3.5"),
    ("last_number", "about 7.0 apples", "7"),
    ("last_number", "no digits", None),
    ("gsm8k", "She sold 24 + 48 = 72 clips.\n#### 72", "72"),
    ("gsm8k", "#### 1,000", "1000"),
    ("gsm8k", "#### -3", "-3"),
    ("gsm8k", "so the total is 15", "15"),
    ("json", 'Sure! {"a": 1, "b": [2]} done', '{"a": 1, "b": [2]}'),
    ("json", '{"b": 2, "a": 1}', '{"a": 1, "b": 2}'),
    ("json", "{not json", None),
    ("none", "  Paris \n", "Paris"),
])
def test_extractors(extractor, text, expected):
    assert make_extractor(extractor)(text) == expected


def test_label_and_regex_extractors():
    label = make_extractor("label", labels=["neg", "pos"])
    assert label("Sentiment: POS, clearly") == "pos" and label("neutral") is None
    assert label("pos at first, then neg") == "pos"
    assert label("for this purpose") is None  # whole words only
    assert make_extractor("label", labels=["正面", "负面"])("情感：负面。") == "负面"
    regex = make_extractor("regex", pattern=r"Answer:\s*(\w+)")
    assert regex("Reasoning...\nAnswer: B") == "B" and regex("no answer") is None


def test_exact_match_with_extractor():
    extract = make_extractor("gsm8k")
    predictions = ["... #### 72", "#### 1,000", "#### 5"]
    references = ["#### 72", "#### 1000", "#### 6"]
    assert exact_match(predictions, references, extract) == pytest.approx(200 / 3)


def test_json_scores_count_fields():
    scores = json_scores(['{"name": "A", "age": 3}', "garbage"], ['{"name": "A", "age": 4}', '{"name": "B"}'])
    assert scores == {"json_valid": 50.0, "json_field_accuracy": pytest.approx(100 / 3)}


def test_generation_metrics_bundle():
    metrics = generation_metrics(["#### 4"], ["#### 4"], extractor="gsm8k")
    assert metrics["exact_match"] == 100.0 and math.isclose(metrics["rouge-1"], 100.0)
    assert set(metrics) == {"exact_match", "rouge-1", "rouge-2", "rouge-l", "bleu-4"}


def test_several_references_best_rouge_any_exact_match_multi_reference_bleu():
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["the cat sat on the mat", "a dog barks loudly", "it rains"]
    references = [["a cat was sitting on a mat", "the cat sat on the mat"], ["the dog is barking"], "it rains"]
    scores = generation_metrics(predictions, references)
    assert scores["exact_match"] == pytest.approx(200 / 3)  # a hit on the second reference counts
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [max(scorer.score(r, p)["rougeL"].fmeasure for r in ([refs] if isinstance(refs, str) else refs))
            for p, refs in zip(predictions, references)]
    assert scores["rouge-l"] == pytest.approx(100 * sum(best) / 3)
    streams = [["a cat was sitting on a mat", "the dog is barking", "it rains"],
               ["the cat sat on the mat", None, None]]
    assert scores["bleu-4"] == pytest.approx(sacrebleu.corpus_bleu(predictions, streams).score)
    # One reference each (the first ones) scores lower: the extra reference is used, not ignored.
    single = generation_metrics(predictions, [refs[0] if isinstance(refs, list) else refs for refs in references])
    assert single["rouge-l"] < scores["rouge-l"] and single["bleu-4"] < scores["bleu-4"]
