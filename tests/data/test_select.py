import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import write_jsonl
from weitiao.cli import main
from weitiao.config import DataSource, ModelConfig, SelectConfig
from weitiao.data.dataset import load_source
from weitiao.data.encode import IGNORE_INDEX
from weitiao.data.select import (_fit, choose, encode_for_scoring, k_center_greedy, proportional_quotas,
                                 select_examples, write_selection)
from weitiao.errors import ConfigError

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    # Two exchanges: only the last reply is scored, conditioned on everything before it.
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}],
]


@pytest.fixture(autouse=True)
def _isolated_score_cache(tmp_path, monkeypatch):
    """Scores cached per test (the models stay in the shared cache)."""

    def cache_dir(*parts: str):
        folder = tmp_path.joinpath("cache", *parts)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    monkeypatch.setattr("weitiao.data.scoring.cache_dir", cache_dir)


def examples_of(tmp_path, conversations=CONVERSATIONS):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": messages} for messages in conversations])
    examples, _ = load_source(DataSource(path=str(path)))
    return examples


def hand_reply_loss(model, tokenizer, messages) -> float:
    """Mean cross-entropy of the last reply and its <|im_end|>, computed on its own, without weitiao's encoder."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    reply = range(len(prompt_ids), len(ids) - 1)  # the template's final newline is layout, not trained
    assert tokenizer.decode(ids[reply.start:reply.stop]) == messages[-1]["content"] + "<|im_end|>"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return float(np.mean([F.cross_entropy(logits[t - 1], torch.tensor(ids[t])).item() for t in reply]))


def hand_end_loss(model, tokenizer, messages, last_tokens: int | None = None) -> float:
    """-log P(<|im_end|> or a token that starts a new line) where <|im_end|> is predicted; with `last_tokens`, the
    model reads only the conversation's last that many tokens."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][-(last_tokens or 0):]
    end = len(ids) - 2  # <|im_end|>, before the template's final newline
    assert tokenizer.convert_ids_to_tokens(ids[end]) == "<|im_end|>"
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.tensor([ids])).logits[0, end - 1].float(), dim=-1)
    newline = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).startswith(("\n", "\r"))]
    assert newline and ids[end] not in newline
    return -float(np.log(probabilities[newline].sum().item() + probabilities[ids[end]].item()))


def test_ifd_is_the_ratio_of_hand_computed_reply_losses(tmp_path, tiny_model_dir):
    from weitiao.models import load_model

    examples = examples_of(tmp_path)
    config = SelectConfig(method="ifd", count=1, model=tiny_model_dir, ifd_max=10)
    selection = select_examples(examples, config)

    model, tokenizer, _ = load_model(ModelConfig(name_or_path=tiny_model_dir))
    for index, messages in enumerate(CONVERSATIONS):
        with_prompt = hand_reply_loss(model, tokenizer, messages)
        # The reply alone: after an empty user turn, in the same template (its default system prompt included).
        alone = hand_reply_loss(model, tokenizer, [{"role": "user", "content": ""}, messages[-1]])
        assert selection.scores["loss_with_prompt"][index] == pytest.approx(with_prompt, rel=1e-4)
        assert selection.scores["loss_alone"][index] == pytest.approx(alone, rel=1e-4)
        assert selection.scores["ifd"][index] == pytest.approx(with_prompt / alone, rel=1e-4)
        assert selection.scores["perplexity"][index] == pytest.approx(np.exp(with_prompt), rel=1e-4)
        # From the same pass, data clean's end-of-reply check: -log P(<|im_end|> or a token that starts with a
        # newline) where <|im_end|> is predicted.
        assert selection.scores["end_loss"][index] == pytest.approx(hand_end_loss(model, tokenizer, messages),
                                                                    rel=1e-4)
    assert selection.selected == [int(np.argmax(selection.scores["ifd"]))]


def test_long_examples_are_cut_like_training_and_scored_on_the_same_reply_tokens(tmp_path, tokenizer):
    long_reply = " ".join(f"word{i}" for i in range(80))
    examples = examples_of(tmp_path, [
        [{"role": "user", "content": "Write many words."}, {"role": "assistant", "content": long_reply}],
        [{"role": "user", "content": "A prompt longer than max_length " * 20}, {"role": "assistant", "content": "x"}]])
    with_prompt, alone, tails = encode_for_scoring(tokenizer, examples, max_length=64)
    assert len(with_prompt[0].input_ids) == 64
    # Where the reply's end is cut off: the conversation's last 64 tokens, where the reply ends (data clean's end
    # check reads it).
    whole = encode_for_scoring(tokenizer, examples, max_length=4096)[0][0]
    assert [len(tail.input_ids) for tail in tails] == [64, 64]
    assert tails[0].input_ids == whole.input_ids[-64:] and tails[0].labels == whole.labels[-64:]
    assert encode_for_scoring(tokenizer, examples, max_length=512)[2] == [None, None]
    labelled = [sum(label != IGNORE_INDEX for label in row.labels) for row in (with_prompt[0], alone[0])]
    assert labelled[0] == labelled[1] > 10
    # The second example keeps no reply token within 64 tokens: it cannot be scored, alone neither (a row the model
    # can still run, without labels: an empty one stopped the whole scoring pass).
    assert all(label == IGNORE_INDEX for label in with_prompt[1].labels)
    assert len(alone[1].input_ids) == 1 and alone[1].labels == [IGNORE_INDEX]


def test_an_example_whose_prompt_fills_max_length_is_excluded_not_fatal(tmp_path, tiny_model_dir):
    examples = examples_of(tmp_path, [
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there, friend."}],
        [{"role": "user", "content": "A prompt longer than max_length " * 20}, {"role": "assistant", "content": "x"}]])
    selection = select_examples(examples, SelectConfig(method="ifd", count=2, model=tiny_model_dir, max_length=64,
                                                       ifd_max=10, cache=False))
    assert selection.selected == [0]
    assert selection.excluded == {1: "no reply token within max_length"}
    assert np.isnan(selection.scores["ifd"][1]) and not np.isnan(selection.scores["ifd"][0])


def test_rerun_uses_the_cache_and_scores_only_new_examples(tmp_path, tiny_model_dir, monkeypatch):
    config = SelectConfig(method="ifd", ratio=0.5, model=tiny_model_dir, ifd_max=10)
    examples = examples_of(tmp_path)
    first = select_examples(examples, config)
    assert first.timing["passes"]["with_prompt"]["computed"] == 3

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every score is cached")

    with monkeypatch.context() as patch:
        patch.setattr("weitiao.data.select._load_scoring_model", no_model)
        again = select_examples(examples, config)
    assert {name: p["computed"] for name, p in again.timing["passes"].items()} == {"with_prompt": 0, "alone": 0}
    assert np.array_equal(again.scores["ifd"], first.scores["ifd"]) and again.selected == first.selected

    grown = examples_of(tmp_path, CONVERSATIONS + [[{"role": "user", "content": "New?"},
                                                   {"role": "assistant", "content": "Yes, new."}]])
    third = select_examples(grown, config)
    assert {name: p["cached"] for name, p in third.timing["passes"].items()} == {"with_prompt": 3, "alone": 3}
    assert {name: p["computed"] for name, p in third.timing["passes"].items()} == {"with_prompt": 1, "alone": 1}
    assert np.array_equal(third.scores["ifd"][:3], first.scores["ifd"])


def test_k_center_greedy_picks_the_farthest_point_each_time():
    points = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [5, 5], [1, 1], [9, 9.5]], dtype=float)
    # From (0,0): (10,10) is farthest; then (10,0) and (0,10) (both 10 away; the first wins); then (5,5).
    assert k_center_greedy(points, 5, first=0) == [0, 3, 1, 2, 4]
    duplicates = np.zeros((3, 2))
    assert sorted(k_center_greedy(duplicates, 3)) == [0, 1, 2]  # never the same point twice


def test_proportional_quotas():
    assert proportional_quotas([10, 5, 1], 8) == [4, 3, 1]
    assert proportional_quotas([3, 3], 10) == [3, 3]  # never more than a group holds
    assert proportional_quotas([4, 4, 4], 2) == [1, 1, 0]  # fewer than one each: the first groups


def test_ifd_plus_kcenter_takes_the_hardest_of_each_cluster():
    # Two directions (embeddings are compared by angle): examples 0-5 point along x, 6-9 along y.
    rng = np.random.default_rng(0)
    embedding = np.vstack([np.array([1.0, 0.0]) + 0.05 * rng.standard_normal((6, 2)),
                           np.array([0.0, 1.0]) + 0.05 * rng.standard_normal((4, 2))])
    ifd = np.array([0.5, 0.9, 1.2, 0.7, 0.8, 0.1, 0.6, 0.95, 0.2, 0.3])
    scores = {"ifd": ifd, "embedding": embedding, "loss_with_prompt": ifd}
    selected, excluded, clusters = choose(scores, SelectConfig(method="ifd+kcenter", count=4, clusters=2), 10)
    assert excluded == {2: "IFD at or above 1.0"}  # 1.2: the instruction does not help
    assert selected == [1, 4, 6, 7]  # the two highest IFD below 1 of each cluster
    assert len(set(clusters[:6]) - {-1}) == 1 and len(set(clusters[6:])) == 1 and clusters[0] != clusters[6]
    # Plain IFD takes the four highest wherever they are.
    assert choose(scores, SelectConfig(method="ifd", count=4), 10)[0] == [1, 3, 4, 7]


def test_perplexity_keeps_low_middle_or_high_and_random_is_seeded():
    perplexity = np.arange(1.0, 11.0)
    scores = {"perplexity": perplexity, "loss_with_prompt": np.log(perplexity)}
    pick = {keep: choose(scores, SelectConfig(method="perplexity", count=3, perplexity_keep=keep), 10)[0]
            for keep in ("low", "middle", "high")}
    assert pick == {"low": [0, 1, 2], "middle": [3, 4, 5], "high": [7, 8, 9]}
    assert choose(scores, SelectConfig(method="perplexity", count=3, max_perplexity=8.5), 10)[1] == {
        8: "perplexity above 8.5", 9: "perplexity above 8.5"}
    random_pick = choose({}, SelectConfig(method="random", ratio=0.3, seed=7), 10)[0]
    assert random_pick == choose({}, SelectConfig(method="random", ratio=0.3, seed=7), 10)[0] and len(random_pick) == 3


def test_judge_score_is_the_expected_rating_under_next_token_probabilities(tmp_path, tiny_model_dir):
    from weitiao.models import load_model

    examples = examples_of(tmp_path)
    config = SelectConfig(method="quality", count=1, model=tiny_model_dir, judge_prompt="Q: {prompt}\nA: {response}")
    selection = select_examples(examples, config)
    model, tokenizer, _ = load_model(ModelConfig(name_or_path=tiny_model_dir))
    ratings = [tokenizer(digit, add_special_tokens=False)["input_ids"][0] for digit in "12345"]
    for index, messages in enumerate(CONVERSATIONS):
        question = f"Q: {messages[-2]['content']}\nA: {messages[-1]['content']}"
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        with torch.no_grad():
            logits = model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, -1]
        expected = float(torch.softmax(logits[ratings], dim=0) @ torch.arange(1.0, 6.0))
        assert selection.scores["quality"][index] == pytest.approx(expected, rel=1e-4)
    assert selection.scores["quality"].min() >= 1 and selection.scores["quality"].max() <= 5


def test_classifier_score_is_the_reward_models_output(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    reward = LlamaForSequenceClassification(AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)).eval()
    folder = tmp_path / "reward"
    reward.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    examples = examples_of(tmp_path)
    config = SelectConfig(method="quality", count=2, scorer="classifier", scorer_model=str(folder))
    selection = select_examples(examples, config)
    for index, messages in enumerate(CONVERSATIONS):
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False,
                        return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = reward(input_ids=ids).logits[0, 0].item()
        assert selection.scores["quality"][index] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert selection.selected == sorted(np.argsort(-selection.scores["quality"])[:2].tolist())


def test_kcenter_with_an_embedding_model(tmp_path, tiny_model_dir):
    examples = examples_of(tmp_path)
    config = SelectConfig(method="kcenter", count=2, embedding_model=tiny_model_dir, model=tiny_model_dir)
    selection = select_examples(examples, config)
    assert selection.scores["embedding"].shape == (3, 64) and len(selection.selected) == 2
    assert list(selection.timing["passes"]) == ["embedding"]  # the scoring model itself did not run


def test_outputs_keep_the_input_format_and_account_for_every_example(tmp_path, tiny_model_dir):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}", "id": f"q{i}"} for i in range(6)]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    examples, _ = load_source(DataSource(path=str(source)))
    config = SelectConfig(method="ifd", count=3, model=tiny_model_dir, ifd_max=10)
    selection = select_examples(examples, config)
    output = tmp_path / "picked.jsonl"
    summary = write_selection(examples, selection, output, config, DataSource(path=str(source)))
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert written == [rows[i] for i in selection.selected]  # the records as they were, extra column too
    scores = [json.loads(line) for line in (tmp_path / "picked.scores.jsonl").read_text().splitlines()]
    assert [row["record"] for row in scores] == [1, 2, 3, 4, 5, 6]
    assert [row["index"] for row in scores if row["selected"]] == selection.selected
    assert all(row["ifd"] == pytest.approx(selection.scores["ifd"][row["index"]], rel=1e-6) for row in scores)
    assert (tmp_path / "picked.scores.png").stat().st_size > 1000
    assert summary["selected"] == 3 and summary["timing"]["passes"]["alone"]["computed"] == 6


def test_cli_select_and_its_errors(tmp_path, tiny_model_dir, capsys):
    rows = [{"instruction": f"Say {word}", "input": "", "output": f"{word}!"} for word in ("a", "b", "c", "d")]
    source = tmp_path / "in.json"
    source.write_text(json.dumps(rows), encoding="utf-8")
    output = tmp_path / "out.json"
    assert main(["data", "select", str(source), str(output), "--method", "perplexity", "--count", "2",
                 "--model", tiny_model_dir]) == 0
    out = capsys.readouterr().out
    assert f"selected 2 of 4 examples (perplexity, budget 2) -> {output}" in out
    assert "pass with_prompt: 4 scored" in out
    assert len(json.loads(output.read_text())) == 2

    # unreadable records skipped on request are counted in the summary and its file
    source.write_text(json.dumps(rows + [{"instruction": "Say e", "output": ""}]), encoding="utf-8")
    assert main(["data", "select", str(source), str(output), "--method", "random", "--count", "2",
                 "--model", tiny_model_dir, "--on-error", "skip"]) == 0
    assert "skipped 1 records that could not be read: 1 x empty response" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.summary.json").read_text())["skipped"] == {"empty response": 1}

    assert main(["data", "select", str(source), str(output), "--ratio", "0.5", "--count", "2"]) == 2
    assert "set exactly one of ratio (a share, e.g. 0.1) and count" in capsys.readouterr().err
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain text"}])
    assert main(["data", "select", str(text), str(tmp_path / "o.jsonl"), "--count", "1", "--model",
                 tiny_model_dir]) == 2
    assert "record 1: selection scores conversations, and this record is plain text" in capsys.readouterr().err


def test_long_judge_and_classifier_inputs_are_cut_in_the_middle():
    # The judge's instructions open its prompt; the reply's end and the answer cue close it.
    assert _fit(list(range(10)), 6) == [0, 1, 2, 7, 8, 9] and _fit([1, 2], 6) == [1, 2]


def test_config_checks():
    with pytest.raises(ValueError, match="judge_prompt must contain"):
        SelectConfig(count=1, judge_prompt="Rate this.")
    with pytest.raises(ValueError, match="unknown template 'custom'; choose auto or alpaca, qa, dolly, chatml"):
        SelectConfig(count=1, template="custom")
    from weitiao.config import section_from_dict

    with pytest.raises(ConfigError, match=r"invalid config \(options\): method: Input should be 'ifd'"):
        section_from_dict(SelectConfig, {"method": "best", "count": 1}, "(options)")


def test_clean_reads_the_end_of_a_reply_longer_than_max_length(tmp_path, tiny_model_dir):
    """ifd_scores (data clean's model rules) scores where a long reply ends on the conversation's last max_length
    tokens; selection alone leaves it NaN (no extra pass)."""
    from weitiao.data.select import ifd_scores
    from weitiao.models import load_model

    conversations = [CONVERSATIONS[0], [{"role": "user", "content": "Write many words."},
                                        {"role": "assistant", "content": " ".join(f"w{i}" for i in range(80))}]]
    examples = examples_of(tmp_path, conversations)
    config = SelectConfig(method="ifd", count=1, model=tiny_model_dir, max_length=48, ifd_max=10)
    scores, timing = ifd_scores(examples, config)
    model, tokenizer, _ = load_model(ModelConfig(name_or_path=tiny_model_dir))
    assert scores["end_loss"][0] == pytest.approx(hand_end_loss(model, tokenizer, conversations[0]), rel=1e-4)
    assert scores["end_loss"][1] == pytest.approx(hand_end_loss(model, tokenizer, conversations[1], 48), rel=1e-4)
    assert timing["passes"]["reply end"]["computed"] == 1
    assert np.isnan(select_examples(examples, config).scores["end_loss"][1])


def test_nearest_neighbours_are_the_most_similar_other_rows_by_cosine_in_any_block_size():
    from weitiao.data.select import nearest_neighbours

    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 8)) * rng.uniform(0.5, 5, size=(50, 1))  # norms vary: cosine, not distance
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    expected = np.argsort(-similarity, axis=1, kind="stable")[:, :5]
    for block in (7, 1024):
        assert np.array_equal(nearest_neighbours(points, 5, block=block), expected)
