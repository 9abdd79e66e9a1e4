import re

import pytest

from weitiao.data.formats import Normalizer, detect_format, to_format
from weitiao.data.readers import Record
from weitiao.errors import DataError


def normalise(data, columns=None, fmt=None, **kwargs):
    record = Record("data.jsonl", 7, 9, data)
    if fmt is None:
        fmt, fields = detect_format(data, columns or {}, "data.jsonl")
    else:
        from weitiao.data.formats import field_map

        fields = field_map(fmt, columns or {})
    normalizer = Normalizer(fmt, fields, **kwargs)
    return fmt, normalizer(record), normalizer.notes


def test_alpaca_with_input_system_and_history():
    fmt, example, _ = normalise({"instruction": "Translate", "input": "你好", "output": "Hello", "system": "Be brief",
                                 "history": [["Hi", "Hello!"]]})
    assert fmt == "alpaca"
    assert example["messages"] == [
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Translate\n你好"},
        {"role": "assistant", "content": "Hello"}]


def test_sharegpt_roles_are_mapped_and_trailing_user_turn_removed():
    fmt, example, notes = normalise({"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "unanswered"}]})
    assert fmt == "sharegpt"
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
    assert notes["trailing user turns removed"] == 1


def test_openai_messages_with_content_parts():
    fmt, example, _ = normalise({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                              {"role": "assistant", "content": "Hello"}]})
    assert fmt == "openai"
    assert example["messages"][0] == {"role": "user", "content": "Hi"}


def test_question_answer_and_numeric_answers():
    fmt, example, _ = normalise({"question": "2+2?", "answer": 4})
    assert fmt == "qa"
    assert example["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_plain_text():
    fmt, example, _ = normalise({"text": "Some domain text."})
    assert (fmt, example) == ("text", {"text": "Some domain text."})


def test_column_mapping_with_prompt_template():
    fmt, example, _ = normalise({"dialogue": "A: hi\nB: bye", "summary": "They part."},
                                columns={"prompt": "dialogue", "response": "summary"},
                                prompt_template="Summarize:\n{dialogue}", system="You summarize.")
    assert fmt == "qa"
    assert example["messages"] == [{"role": "system", "content": "You summarize."},
                                   {"role": "user", "content": "Summarize:\nA: hi\nB: bye"},
                                   {"role": "assistant", "content": "They part."}]


def test_unknown_format_lists_what_was_found():
    with pytest.raises(DataError, match=r"data.jsonl: record 1: cannot tell the data format from the columns "
                                        r"\['body', 'title'\].*\(e.g. columns: \{prompt: dialogue"):
        normalise({"title": "x", "body": "y"})


@pytest.mark.parametrize("record, hint", [
    ({"question": "q", "std_answer": "a", "class": "math"}, "{prompt: question, response: std_answer}"),  # BELLE eval
    ({"Question": "q", "Best Answer": "a", "Category": "c"}, "{prompt: Question, response: Best Answer}"),
    ({"input": "q", "target": "a"}, "{prompt: input, response: target}"),
    ({"question": "q", "mc1_targets": {"a": 1}}, "e.g. columns: {prompt: dialogue, response: summary}"),  # not text
])
def test_an_unknown_format_suggests_the_mapping_its_column_names_suggest(record, hint):
    with pytest.raises(DataError, match=re.escape(hint)):
        normalise(record)


def test_question_and_answer_columns_are_found_whatever_their_case():
    fmt, example, _ = normalise({"Question": "Q", "Answer": "A"})
    assert fmt == "qa"
    assert [m["content"] for m in example["messages"]] == ["Q", "A"]


@pytest.mark.parametrize("data, fmt, message", [
    ({"instruction": "Do it"}, "alpaca", "record 7 (line 9): field 'output': missing field"),
    ({"instruction": "Do it", "output": None}, "alpaca", "field 'output': value is null"),
    ({"instruction": "Do it", "output": "  "}, "alpaca", "field 'output': empty response"),
    ({"instruction": ["a"], "output": "x"}, "alpaca", "field 'instruction': expected a string, got list"),
    ({"instruction": "a", "output": "b", "history": "nope"}, "alpaca", "field 'history': expected a list"),
    ({"conversations": "hi"}, "sharegpt", "field 'conversations': expected a list of turns, got str"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "field 'conversations[0].from': unknown role"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}, "sharegpt",
     "field 'conversations[1].value': empty response"),
    ({"conversations": [{"from": "gpt", "value": "hello"}]}, "sharegpt",
     "field 'conversations[0].value': expected a user turn here"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}, "sharegpt",
     "expected an assistant turn here"),
    ({"messages": [{"role": "user", "content": 5}]}, "openai", "field 'messages[0].content': expected a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "openai", "no assistant reply to train on"),
    ({"question": "q"}, "qa", "field 'answer': missing field"),
])
def test_bad_records_name_file_record_and_field(data, fmt, message):
    with pytest.raises(DataError) as error:
        normalise(data, fmt=fmt)
    assert str(error.value).startswith("data.jsonl: record 7")
    assert message in str(error.value)


def test_prompt_template_with_unknown_column():
    with pytest.raises(DataError, match=r"prompt_template uses \{dialog\}"):
        normalise({"question": "q", "answer": "a"}, prompt_template="{dialog}")


def test_columns_that_are_not_fields_of_the_format():
    from weitiao.data.formats import field_map

    with pytest.raises(DataError, match="not fields of format 'alpaca'"):
        field_map("alpaca", {"prompt": "x"})


@pytest.mark.parametrize("target", ["alpaca", "sharegpt", "openai", "qa"])
def test_convert_round_trips_multi_turn(target):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
    written = to_format({"messages": messages}, target)
    _, back, _ = normalise(written)
    assert back["messages"] == messages


def test_query_response_history_keeps_the_earlier_turns():
    # ms-swift's and ChatGLM's layout: the history is part of the conversation, not a column to drop.
    fmt, example, _ = normalise({"system": "S", "query": "Q2", "response": "A2", "history": [["Q1", "A1"]]})
    assert fmt == "qa"
    assert example["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    with pytest.raises(DataError, match=r"field 'history\[0\]': expected a \[prompt, response\] pair"):
        normalise({"query": "Q2", "response": "A2", "history": [["Q1"]]})


@pytest.mark.parametrize("turns", ["messages", "conversations"])
def test_a_system_column_beside_the_turns_is_the_system_prompt(turns):
    user, assistant = ({"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"})
    _, example, _ = normalise({"system": "S", turns: [user, assistant]})
    assert example["messages"] == [{"role": "system", "content": "S"}, user, assistant]
    # a system turn of the conversation itself wins over the column
    _, example, _ = normalise({"system": "S", turns: [{"role": "system", "content": "T"}, user, assistant]})
    assert example["messages"][0] == {"role": "system", "content": "T"}


def test_an_instruction_mapped_to_the_input_column_is_read_once():
    _, example, _ = normalise({"input": "一加一", "target": "二"}, columns={"instruction": "input", "output": "target"})
    assert example["messages"][0] == {"role": "user", "content": "一加一"}


def test_firefly_conversations_of_exchanges():
    fmt, example, _ = normalise({"conversation_id": 7, "category": "Brainstorming", "conversation": [
        {"human": "Q1", "assistant": "A1"}, {"human": "Q2", "assistant": "A2"}]})
    assert fmt == "sharegpt"
    assert [(m["role"], m["content"]) for m in example["messages"]] == [
        ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    with pytest.raises(DataError, match=r"field 'conversation\[1\].assistant': empty response"):
        normalise({"conversation": [{"human": "Q1", "assistant": "A1"}, {"human": "Q2", "assistant": " "}]})
    with pytest.raises(DataError, match=r"field 'conversation\[0\].human': expected a string, got int"):
        normalise({"conversation": [{"human": 3, "assistant": "A1"}]})
