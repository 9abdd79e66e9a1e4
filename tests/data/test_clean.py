import json

import pytest

from tests.conftest import write_jsonl
from weitiao.cli import main
from weitiao.config import CleanConfig, DataSource
from weitiao.data.clean import clean_examples, language_share, looks_truncated, write_clean
from weitiao.errors import ConfigError, DataError

STORY = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch and wonders why the "
         "dog never chases anything at all, not even the chickens that wander across the yard every morning.")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_duplicates_exact_and_near_are_removed_and_distinct_records_kept(tmp_path):
    rows = [
        {"id": 1, "instruction": "Tell a story about a fox.", "output": STORY},
        {"id": 2, "instruction": "tell a   STORY about a fox.", "output": STORY.upper()},  # same once normalised
        {"id": 3, "instruction": "Tell a story about a fox.", "output": STORY.replace("porch", "balcony")},  # near
        {"id": 4, "instruction": "Tell a story about a cat.", "output": "A cat slept in the sun all afternoon."},
        {"id": 5, "instruction": "Name a prime.", "output": "Seven is a prime number."},
        {"id": 6, "instruction": "Name a prime.", "output": "Eleven is a prime number, and so is thirteen."},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    result = clean_examples(DataSource(path=str(source)), CleanConfig())
    summary = write_clean(result, tmp_path / "out.jsonl", str(source))

    assert [row["id"] for row in read_jsonl(tmp_path / "out.jsonl")] == [1, 4, 5, 6]
    removed = read_jsonl(tmp_path / "out.removed.jsonl")
    assert [(item["record"], item["rule"]) for item in removed] == [(2, "exact_duplicate"), (3, "near_duplicate")]
    assert removed[0]["detail"] == f"same as record 1 of {source}"
    assert removed[1]["detail"].startswith("similarity 0.") and "with record 1" in removed[1]["detail"]
    assert removed[1]["original"] == rows[2]  # the record as it was, every column
    assert summary["removed_by_rule"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert json.loads((tmp_path / "out.summary.json").read_text())["kept"] == 4

    # Near-duplicate detection off: the near copy stays; a stricter threshold keeps it too.
    result = clean_examples(DataSource(path=str(source)), CleanConfig(near_dedup=False))
    assert result.counts == {"exact_duplicate": 1}
    result = clean_examples(DataSource(path=str(source)), CleanConfig(near_dup_threshold=0.98))
    assert "near_duplicate" not in result.counts
    with pytest.raises(ConfigError, match="near_dup_threshold 0.999 is too close to 1 for num_perm 128"):
        clean_examples(DataSource(path=str(source)), CleanConfig(near_dup_threshold=0.999))


def test_a_short_reply_edited_under_the_same_prompt_is_a_near_duplicate(tmp_path):
    """One edit changes most of a short reply's n-grams, so MinHash misses it; the same prompt with a reply alike
    character by character (difflib's ratio >= near_dup_threshold) is a near duplicate."""
    rows = [
        {"instruction": "你好", "output": "你好！今天我能为你提供什么帮助？"},
        {"instruction": "20和45的最大公因数是多少？", "output": "20 和 45 的最大公因数是 5。"},
        {"instruction": "你好", "output": "那么，你好！今天我能为你提供什么帮助？"},  # a word added
        {"instruction": "20和45的最大公因数是多少？", "output": "20 和 45 的最大因公数是 5。"},  # two swapped
        {"instruction": "你好", "output": "你好呀，有什么想聊的吗？"},  # another reply to the same prompt
        {"instruction": "您好", "output": "那么，你好！今天我能为你提供什么帮助？"},  # another prompt
    ]
    result = clean_examples(DataSource(path=str(write_jsonl(tmp_path / "in.jsonl", rows))), CleanConfig())
    assert [(item.record, item.rule) for item in result.removed] == [(3, "near_duplicate"), (4, "near_duplicate")]
    assert "the same prompt as record 1" in result.removed[0].detail and "0.91 alike" in result.removed[0].detail
    assert "the same prompt as record 2" in result.removed[1].detail and "0.94 alike" in result.removed[1].detail
    assert _rules(tmp_path, rows, near_dup_threshold=0.92) == [(4, "near_duplicate")]
    assert _rules(tmp_path, rows, near_dedup=False) == []


def test_dedup_on_prompt_keeps_one_reply_per_prompt(tmp_path):
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "2+2?", "answer": "Four."},
            {"question": "3+3?", "answer": "6"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    assert clean_examples(DataSource(path=str(source)), CleanConfig()).counts == {}
    result = clean_examples(DataSource(path=str(source)), CleanConfig(dedup_on="prompt"))
    assert result.counts == {"exact_duplicate": 1} and result.removed[0].record == 2


def test_every_removed_record_is_in_the_side_file_with_its_rule(tmp_path):
    rows = [
        {"instruction": "Fine", "output": "A complete answer."},                        # 1 kept
        {"instruction": "Missing output"},                                              # 2 invalid
        {"instruction": "Blank", "output": "   "},                                      # 3 empty (reader)
        {"instruction": "Invisible", "output": "\u200b"},                               # 4 empty (zero width)
        {"instruction": "Short", "output": "ok"},                                       # 5 short_response
        {"instruction": "Cut", "output": "The steps are: first, open the file,"},       # 6 truncated
        {"instruction": "Code", "output": "```python\nprint(1)\n"},                     # 7 truncated
        {"instruction": "中文", "output": "This reply is in English, not Chinese."},     # 8 kept (language any)
        {"instruction": "Long", "output": "x" * 500},                                   # 9 too_long
    ]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    result = clean_examples(DataSource(path=str(source)), CleanConfig(min_response_chars=3, max_chars=300))
    write_clean(result, tmp_path / "out.jsonl", str(source))
    removed = {item["record"]: item for item in read_jsonl(tmp_path / "out.removed.jsonl")}
    assert {number: item["rule"] for number, item in removed.items()} == {
        2: "invalid", 3: "empty_response", 4: "empty_response", 5: "short_response", 6: "truncated",
        7: "truncated", 9: "too_long"}
    assert "field 'output': missing field" in removed[2]["detail"]
    kept = read_jsonl(tmp_path / "out.jsonl")
    assert len(kept) + len(removed) == len(rows)  # nothing lost silently
    assert [removed[n]["original"] for n in sorted(removed)] == [rows[n - 1] for n in sorted(removed)]


def test_language_filter_counts_units_in_replies_without_code():
    assert language_share("这是中文回答。", "zh") == 1.0
    # One CJK character is one unit and one English word is one unit: 6 of 7 units are Chinese.
    assert language_share("我们用 Python 写代码", "zh") == pytest.approx(6 / 7)
    assert language_share("答案如下\n```python\nprint('hello world')\n```", "zh") == 1.0
    assert language_share("12345", "zh") is None
    assert language_share("Hello there, 你好", "en") == pytest.approx(2 / 4)
    assert looks_truncated("Done.") is None and looks_truncated("步骤如下：") == "ends with '：'"


def test_language_rule_removes_replies_in_another_language(tmp_path):
    rows = [{"instruction": "问候", "output": "你好，很高兴见到你。"},
            {"instruction": "问候", "output": "Hello, nice to meet you."}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    result = clean_examples(DataSource(path=str(source)), CleanConfig(language="zh"))
    assert [item.record for item in result.removed] == [2] and result.removed[0].rule == "language"
    result = clean_examples(DataSource(path=str(source)), CleanConfig(language="zh", min_response_chars=20))
    with pytest.raises(DataError, match=r"every record was removed \(1 short_response, 1 language\); nothing"):
        write_clean(result, tmp_path / "out.jsonl", str(source))


def test_cli_clean_keeps_the_input_format_and_refuses_to_overwrite_the_input(tmp_path, capsys):
    rows = [{"instruction": "Q", "input": "ctx", "output": "Answer one.", "source": "a"},
            {"instruction": "Q", "input": "ctx", "output": "Answer one.", "source": "b"}]
    source = tmp_path / "in.json"
    source.write_text(json.dumps(rows), encoding="utf-8")
    assert main(["data", "clean", str(source), str(tmp_path / "out.json"), "--no-near-dedup"]) == 0
    out = capsys.readouterr().out
    assert "read 2 records, kept 1" in out and "1  exact_duplicate" in out
    assert json.loads((tmp_path / "out.json").read_text()) == rows[:1]  # alpaca json, input and extra column kept

    assert main(["data", "clean", str(source), str(source)]) == 2
    assert "the output would overwrite the input" in capsys.readouterr().err
    assert main(["data", "clean", str(source), str(tmp_path / "out.txt")]) == 2
    assert "unsupported output file type '.txt'" in capsys.readouterr().err
    assert main(["data", "clean", str(source), str(tmp_path / "o.json"), "--near-dup-threshold", "2"]) == 2
    assert "near_dup_threshold: Input should be less than or equal to 1" in capsys.readouterr().err


def test_real_chinese_data(shared_data, tmp_path):
    """sharegpt_zh has a reply that is only U+200B and one conversation without a reply; alpaca_zh has exact
    duplicates. Every record is kept or accounted for."""
    source = shared_data / "sharegpt_zh" / "sharegpt_zh_1K_format.jsonl"
    result = clean_examples(DataSource(path=str(source)), CleanConfig())
    assert result.counts["invalid"] == 1 and result.counts["empty_response"] >= 1
    assert any(item.original["conversations"][-1]["value"] == "\u200b" for item in result.removed)
    assert len(result.kept) + len(result.removed) == result.records == 1000

    source = shared_data / "alpaca_zh" / "alpaca_zh_demo.json"
    result = clean_examples(DataSource(path=str(source)), CleanConfig())
    assert result.counts["exact_duplicate"] >= 1
    assert len(result.kept) + len(result.removed) == result.records == 1000


def _rules(tmp_path, rows, **options):
    """(record number, rule) of every removed record."""
    source = write_jsonl(tmp_path / "rules.jsonl", rows)
    result = clean_examples(DataSource(path=str(source)), CleanConfig(**options))
    return sorted((item.record, item.rule) for item in result.removed)


def test_refusals_are_removed_but_apologetic_answers_are_not(tmp_path):
    rows = [
        {"instruction": "Write a poem about rain.", "output": "I'm sorry, but I can't help with that request."},
        {"instruction": "写一首关于雨的诗。", "output": "作为一个AI语言模型，我无法提供这方面的帮助。"},
        {"instruction": "我和女朋友分手了，怎么办？",
         "output": "非常抱歉听到这个消息！以下是一些建议：多和朋友在一起，做让你开心的事。"},
        {"instruction": "Was my last answer right?", "output": "Sorry, my earlier answer was wrong: 2 + 2 is 4."},
        {"instruction": "Explain the refusal.", "output": "As an AI I cannot browse. " + STORY * 3},  # long: an answer
    ]
    assert _rules(tmp_path, rows) == [(1, "refusal"), (2, "refusal")]
    assert _rules(tmp_path, rows, refusal=False) == []


def test_language_auto_wants_each_reply_in_its_prompts_language(tmp_path):
    rows = [
        {"instruction": "列出四张披头士专辑。",
         "output": "Here are four albums by The Beatles: Abbey Road, Revolver and Help."},
        {"instruction": "Name four albums by the Beatles.",
         "output": "披头士的四张专辑：艾比路、左轮手枪、救命和白色专辑。"},
        {"instruction": "把这句话翻译成英文：我爱你。", "output": "I love you, and I will always love you."},  # asked
        {"instruction": "编写JavaScript脚本以打印当前日期。", "output": "var d = new Date();\nconsole.log(d)"},  # code
        {"instruction": "列出四种水果。", "output": "苹果、香蕉、橙子和葡萄都是常见的水果。"},
        {"instruction": "Name a color.", "output": "Blue is a color of the sky."},
        # English text the prompt quotes or ends with is its input: an English reply may be about it
        {"instruction": "用“shimmer”和“keepsake”这两个词造一个句子。",
         "output": "The shimmer of the old keepsake brought back memories."},
        {"instruction": "改变以下名词为复数形式：watch", "output": "The plural form of the word is watches."},
        {"instruction": "用“光芒”造一个句子。", "output": "The light of the morning sun filled the room."},  # zh quote
        # Code for an English request, with Chinese comments and prose: Chinese; code for a Chinese one: code
        {"instruction": "Write a python function that counts x in a list.",
         "output": "下面是代码：\ndef count(x, y):\n    # 统计x在列表y中出现的次数\n    return y.count(x)"},
        {"instruction": "写一个Python函数，统计x在列表中出现的次数。",
         "output": "def count(x, y):\n    # count how often x is in the list y\n    return y.count(x)"},
        # A language named in the text to work on, not in the instruction (its first or last line)
        {"instruction": "Predict the news' impact on the stock.\nTesla's Chinese rival cut its prices again.\n"
                        "Output positive, negative or neutral.", "output": "负面"},
    ]
    assert _rules(tmp_path, rows, language="auto") == [(1, "language"), (2, "language"), (9, "language"),
                                                       (10, "language"), (12, "language")]
    assert _rules(tmp_path, rows) == []  # language any: nothing checked


def test_language_auto_reads_short_chinese_replies_and_leaves_formulas_alone(tmp_path):
    rows = [
        {"instruction": "Classify the sentiment of the review: the food was cold.", "output": "负面"},
        {"instruction": "Solve: Tom has 5 balls and buys 6 more. How many now?",
         "output": "汤姆原来有5个球，又买了6个，5+6=11。答案是11。"},  # Chinese prose with a formula in it
        {"instruction": "Sort the list: 10, 2, 5.", "output": "2, 5, 10"},
        {"instruction": "编写SQL查询，找出平均工资高于全体平均的院系。",
         "output": "SELECT dept_name FROM instructor GROUP BY dept_name HAVING AVG(salary) > (SELECT AVG(salary) "
                   "FROM instructor)"},  # a query, not English prose
        {"instruction": "这条评论是正面还是负面？用英文回答。", "output": "Negative"},  # names the language
        {"instruction": "判断这句话的情感倾向。", "output": "Positive sentiment overall"},  # too short to judge
    ]
    assert _rules(tmp_path, rows, language="auto") == [(1, "language"), (2, "language")]


def test_fillers_are_removed_unless_the_prompt_asks_for_them(tmp_path):
    rows = [
        {"instruction": "Write a haiku about autumn.", "output": "Sure."},
        {"instruction": "写一首关于秋天的诗。", "output": "好的。"},
        {"instruction": "列举三种水果。", "output": "略"},
        {"instruction": "Rewrite the sentence in the passive voice: the cat ate the fish.", "output": "Done."},
        {"instruction": "Is the sky blue on a clear day?", "output": "Yes"},  # a yes/no question
        {"instruction": "Tell me if the sentence contains toxic language: you are an idiot.", "output": "Yes"},
        {"instruction": "这个句子是否通顺：我吃饭了。", "output": "是的"},
        {"instruction": "I will send the text in parts. Reply OK after each part.", "output": "OK"},  # asked for
        {"instruction": "Can you write me a poem about rain?", "output": "Sure!"},  # a request, not a question
        {"instruction": "Extract the dates in: no date here.", "output": "None"},  # an answer
        {"instruction": "Name a fruit.", "output": "Okay, apples."},
        {"instruction": "Does the series of 1/n^2 converge?", "output": "Sure."},  # no answer to a yes/no question
        {"instruction": "提出五种增加动力的策略。", "output": "略"},  # 略 is in 策略, but not named as a word
        {"instruction": "Mark skipped items with 略 and the others with 好.", "output": "略"},  # named
    ]
    assert _rules(tmp_path, rows, exact_dedup=False, near_dedup=False) == [
        (1, "filler"), (2, "filler"), (3, "filler"), (4, "filler"), (9, "filler"), (12, "filler"), (13, "filler")]
    assert _rules(tmp_path, rows, filler=False, exact_dedup=False, near_dedup=False) == []


@pytest.mark.parametrize("reply, why", [
    ("Al weighs 146 + 38 = 184 pounds.\nBen weighs 146 - 16 = ", "ends inside a calculation"),
    ("The total is 3 * $4 = $<<3*4", "never closed"),
    ("优势如下：\n1. 清洁：不排放温室气体。\n\n2. ", "empty list item"),
    ("43. 锝（Technetium, Tc）\n44. 钌(Ru", "never closed"),
    ("She earns 8 * ", "ends inside a calculation"),
    ("For the four bottles she paid 4 * 1.5 = $<<4*1.5=6>>", "ends inside a calculation"),  # no result after it
    ("He is left with 20 - 5 = <", "ends inside a calculation"),
    ("The steps are as follows;", "ends with ';'"),
])
def test_replies_cut_inside_a_calculation_a_bracket_or_a_list_are_truncated(reply, why):
    assert why in looks_truncated(reply)


@pytest.mark.parametrize("reply", ["The answer is **42**", "Use C++", "He got an A+", "x = 5\ny = x * 2",
                                   "巴西利斯克（Basilisk)是一种生物。", "- apples\n- pears", "1) first\n2) second",
                                   "#### 72", "Answer: 8 - 3 = 5", "var d = new Date();\nconsole.log(d);",
                                   "He has <<2+3=5>>5 apples."])
def test_finished_replies_are_not_truncated(reply):
    assert looks_truncated(reply) is None


def test_a_footer_shared_by_many_records_is_boilerplate(tmp_path):
    footer = "Thank you for reading! Please like and subscribe to our newsletter for more."
    rows = [{"instruction": f"Question {i}?", "output": f"Answer number {i} is here.\n\n{footer}"} for i in range(4)]
    rows += [{"instruction": f"Other {i}?", "output": f"A different answer, number {i}."} for i in range(4)]
    no_dedup = {"exact_dedup": False, "near_dedup": False}  # the answers differ in one word only
    assert _rules(tmp_path, rows, boilerplate_records=4, **no_dedup) == [
        (1, "boilerplate"), (2, "boilerplate"), (3, "boilerplate"), (4, "boilerplate")]
    assert _rules(tmp_path, rows, boilerplate_records=5, **no_dedup) == []  # in 4 records only
    assert _rules(tmp_path, rows, boilerplate_records=None, **no_dedup) == []


def test_truncated_sentence_catches_a_reply_cut_mid_sentence(tmp_path):
    rows = [{"instruction": "Tell a story.", "output": STORY[:120]},  # cut inside a word
            {"instruction": "Tell a story.", "output": STORY},
            {"instruction": "Name an album.", "output": "Abbey Road"},  # short: a title, not prose
            {"instruction": "What is 6 x 7?", "output": "Six times seven is 42"}]
    assert looks_truncated(STORY[:120], in_sentence=True) == "ends inside a sentence"
    assert _rules(tmp_path, rows, truncated_sentence=True, exact_dedup=False, near_dedup=False) == [(1, "truncated")]
    assert _rules(tmp_path, rows, exact_dedup=False, near_dedup=False) == []  # off by default


def test_model_rules_remove_mismatched_and_cut_off_replies_by_their_scores(tmp_path, monkeypatch):
    """The plumbing: only records that pass the text rules are scored; IFD >= mismatch_ifd is mismatched; a reply
    of 20 characters or more that ends in a letter or a digit, where ending or breaking the line has a probability
    below end_probability, is truncated (not one that ends in punctuation, nor a short one, nor one whose end
    max_length cut off: NaN); no scores at all (NaN) pass."""
    import numpy as np

    import weitiao.data.clean as clean

    scored = []
    unlikely_end = -np.log(0.0005)  # below the default end_probability of 0.005
    outputs = ["Reply 0 is complete.", "Reply 1 is complete.", "Reply 2.", "Reply 3 is complete.",
               "The answer is that we first compute th", "The total is 4 + 5 = 9, so 9", "This reply stops at a",
               "短答案被截断了", "日本流行音乐艺术家有很多，例如宇多田光、椎名林檎，还有很多其他的",
               "The total is 4 + 5 = 9, so 9 + 3 = 12."]
    ifd = [0.5, 1.0, np.nan, 1.3, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    end_loss = [0.1, 0.1, np.nan, 0.1, unlikely_end, unlikely_end, np.nan, unlikely_end, unlikely_end, unlikely_end]

    def fake_ifd_scores(examples, config, embed):
        scored.append([e.messages[0]["content"] for e in examples])
        assert config.model == "my-model" and config.max_length == 256
        assert not embed  # 10 records scored, not more than the 40 neighbours: no neighbourhood rules
        return {"ifd": np.array(ifd), "end_loss": np.array(end_loss)}, {}

    monkeypatch.setattr(clean, "ifd_scores", fake_ifd_scores)
    rows = [{"instruction": f"Q{i}?", "output": output} for i, output in enumerate(outputs)]
    rows.insert(1, {"instruction": "Q0?", "output": "Reply 0 is complete."})  # an exact duplicate: not scored
    assert _rules(tmp_path, rows, model="my-model", max_length=256) == [
        (2, "exact_duplicate"), (3, "mismatched"), (5, "mismatched"), (6, "truncated"), (7, "truncated"),
        (10, "truncated")]
    assert scored == [[f"Q{i}?" for i in range(10)]]
    assert _rules(tmp_path, rows, model="my-model", max_length=256, end_probability=0) == [
        (2, "exact_duplicate"), (3, "mismatched"), (5, "mismatched")]
    assert _rules(tmp_path, rows, model="my-model", max_length=256, end_probability=0.0001) == [
        (2, "exact_duplicate"), (3, "mismatched"), (5, "mismatched")]


def test_neighbourhood_rules_compare_a_record_with_those_of_the_nearest_prompts(tmp_path, monkeypatch):
    """With more scored records than `neighbours`: a reply that ends in a word, where ending_share of the nearest
    prompts' replies end with a '####' line, is truncated (not one that ends a sentence); an IFD mismatch_outlier
    median absolute deviations above the neighbours' median is mismatched (not a smaller one, nor with the
    rules off)."""
    import numpy as np

    import weitiao.data.clean as clean

    math_answer = "Each box holds 4 apples, so 3 boxes hold 3 * 4 = 12 apples.\n#### 12"
    replies = [math_answer] * 5 + [
        "Each box holds 4 apples, so 3 boxes hold 3 * 4 = 12 apples, and the",  # cut before its '####' line
        math_answer,  # a reply the prompt helps far less than its neighbours' prompts help theirs
        "Each box holds 4 apples, so the answer is 12.",  # no '####' line, but a finished sentence
    ] + ["这个问题的答案取决于具体情况，需要综合考虑。"] * 6
    ifd = [0.60, 0.61, 0.59, 0.62, 0.60, 0.61, 0.85, 0.60] + [0.90, 0.91, 0.89, 0.92, 0.88, 0.95]
    # Two clusters of prompts; the sentence-ending record a little apart from its cluster.
    offsets = np.linspace(0, 0.05, 14)[:, None] * np.array([[0, 0, 1, 0]])
    embedding = np.array([[1.0, 0, 0, 0]] * 7 + [[1.0, 0, 0, 0.3]] + [[0, 1.0, 0, 0]] * 6) + offsets

    embedded = []

    def fake_ifd_scores(examples, config, embed):
        embedded.append(embed)
        scores = {"ifd": np.array(ifd), "end_loss": np.full(len(ifd), 0.1)}
        return {**scores, "embedding": embedding} if embed else scores, {}

    monkeypatch.setattr(clean, "ifd_scores", fake_ifd_scores)
    rows = [{"instruction": f"Question {i}: how many apples?" if i < 8 else f"问题{i}：怎么办？", "output": reply}
            for i, reply in enumerate(replies)]
    options = {"model": "my-model", "neighbours": 5, "exact_dedup": False, "near_dedup": False}
    source = write_jsonl(tmp_path / "rules.jsonl", rows)
    removed = clean_examples(DataSource(path=str(source)), CleanConfig(**options)).removed
    assert [(item.record, item.rule) for item in removed] == [(6, "truncated"), (7, "mismatched")]
    assert "5 of the 5 records with the nearest prompts end their reply with a line starting '####'" in \
        removed[0].detail
    assert removed[1].detail.startswith("IFD 0.850, 12.0 median absolute deviations above the 0.610 of the 5")
    assert _rules(tmp_path, rows, **{**options, "mismatch_outlier": 13}) == [(6, "truncated")]
    assert _rules(tmp_path, rows, **{**options, "neighbours": 0}) == []
    assert embedded == [True, True, False]  # no embeddings asked for without the rules that use them
