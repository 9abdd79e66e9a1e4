from __future__ import annotations

import threading

import pytest

from weitiao.errors import WeitiaoError
from weitiao.serve.engine import (ContextLengthError, Engine, SamplingParams, UnknownModelError,
                                  parse_adapter_specs)

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def sampled(seed: int, max_tokens: int = 24, **kwargs) -> SamplingParams:
    # The tiny random model repeats one token under greedy decoding; seeded sampling gives varied text.
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, **kwargs)


def test_streamed_pieces_make_the_reply_and_seeds_reproduce(engine):
    generation = engine.chat("base", HELLO, sampled(seed=1))
    pieces = list(generation)
    assert len(pieces) > 3 and "".join(pieces) == generation.text
    assert generation.completion_tokens == 24 and generation.finish_reason == "length"
    assert generation.prompt_tokens == engine.count_tokens("base", engine.render_chat("base", HELLO))
    assert engine.chat("base", HELLO, sampled(seed=1)).result() == generation.text
    assert engine.chat("base", HELLO, sampled(seed=2)).result() != generation.text


def test_adapter_and_base_answer_differently_and_base_is_the_plain_model(engine, tiny_model):
    base = engine.chat("base", HELLO, sampled(seed=3)).result()
    tuned = engine.chat("tuned", HELLO, sampled(seed=3)).result()
    assert tuned != base
    plain = Engine(str(tiny_model))  # no adapter attached at all
    try:
        assert plain.chat(plain.default_model, HELLO, sampled(seed=3)).result() == base
    finally:
        plain.close()


def test_each_model_uses_its_own_chat_template_and_stops(engine):
    assert engine.render_chat("base", HELLO).startswith("<|im_start|>system")
    assert "### Instruction:\nHello, who are you?\n\n### Response:\n" in engine.render_chat("tuned", HELLO)
    assert engine.get("tuned").stop_strings == ["### End"]  # the dolly template the adapter was trained with
    assert engine.get("base").stop_strings == []


def test_stop_strings_cut_the_reply(engine):
    full = engine.chat("base", HELLO, sampled(seed=4, max_tokens=30)).result()
    stop = full[12:16]
    assert stop.strip() and full.find(stop) > 0
    cut = engine.chat("base", HELLO, sampled(seed=4, max_tokens=30, stop=[stop]))
    assert cut.result() == full[:full.find(stop)]
    assert cut.finish_reason == "stop" and cut.completion_tokens < 30


def test_concurrent_requests_get_their_own_answers(engine):
    jobs = [("base" if i % 2 else "tuned", 100 + i) for i in range(8)]
    expected = {job: engine.chat(job[0], HELLO, sampled(seed=job[1], max_tokens=12)).result() for job in jobs}
    results: dict = {}

    def ask(job):
        results[job] = "".join(engine.chat(job[0], HELLO, sampled(seed=job[1], max_tokens=12)))

    threads = [threading.Thread(target=ask, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == expected
    assert len(set(expected.values())) == len(jobs)  # all different, so a mix-up would show


def test_cancel_stops_generation_and_the_engine_keeps_serving(engine):
    generation = engine.chat("base", HELLO, sampled(seed=5, max_tokens=400))
    next(iter(generation))
    generation.cancel()
    assert generation.done.wait(timeout=30)
    assert generation.completion_tokens < 400 and generation.was_cancelled
    assert engine.chat("base", HELLO, sampled(seed=1)).result() == engine.chat("base", HELLO, sampled(seed=1)).result()


def test_context_window_limits(engine):
    with pytest.raises(ContextLengthError, match="maximum context length is 512"):
        engine.chat("base", HELLO, SamplingParams(max_tokens=1000))
    default = engine.chat("base", [{"role": "user", "content": "word " * 400}], SamplingParams(temperature=0))
    assert default.prompt_tokens + default.params.max_tokens == 512  # no max_tokens: what the context leaves
    default.cancel()

    history = [{"role": "system", "content": "Be brief."}]
    for turn in range(12):
        history += [{"role": "user", "content": f"question {turn} " + "blah " * 20},
                    {"role": "assistant", "content": f"answer {turn} " + "blah " * 20}]
    history.append({"role": "user", "content": "last question"})
    fitted = engine.fit_messages("base", history, max_tokens=100)
    assert fitted[0] == history[0] and fitted[-1] == history[-1] and fitted[1]["role"] == "user"
    assert len(fitted) < len(history)
    assert engine.count_tokens("base", engine.render_chat("base", fitted)) + 100 <= 512
    one_more_exchange = [history[0]] + history[-len(fitted) - 1:]  # what was dropped last did not fit
    assert engine.count_tokens("base", engine.render_chat("base", one_more_exchange)) + 100 > 512
    with pytest.raises(ContextLengthError, match="last message alone"):
        engine.fit_messages("base", [{"role": "user", "content": "blah " * 600}], max_tokens=10)
    # No max_tokens: 512 tokens of reply, but never more than half of this 512-token window.
    short_question = [{"role": "user", "content": "hello " * 100}]
    assert engine.fit_messages("base", short_question, max_tokens=None) == short_question


def test_unknown_model(engine):
    with pytest.raises(UnknownModelError, match="'nope' does not exist.*base, tuned"):
        engine.chat("nope", HELLO, SamplingParams())


def test_adapter_errors_are_clear(engine, tmp_path, tiny_model, other_tiny_model, tiny_adapter):
    with pytest.raises(WeitiaoError, match="adapter folder not found"):
        engine.add_adapter("missing", tmp_path / "nowhere")
    with pytest.raises(WeitiaoError, match="holds a full model, not an adapter"):
        engine.add_adapter("full", tiny_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeitiaoError, match="no adapter_config.json"):
        engine.add_adapter("empty", tmp_path / "empty")
    with pytest.raises(WeitiaoError, match="already taken"):
        engine.add_adapter("tuned", tiny_adapter)
    other = Engine(str(other_tiny_model))
    try:
        with pytest.raises(WeitiaoError, match="trained on .*a different model"):
            other.add_adapter("tuned", tiny_adapter)
    finally:
        other.close()


@pytest.mark.parametrize("spec", ["outputs/demo", "=outputs/demo", "tuned=", "bad name=x"])
def test_adapter_spec_syntax(spec):
    with pytest.raises(WeitiaoError, match="NAME=PATH|may only use"):
        parse_adapter_specs([spec])


def test_adapter_specs():
    assert parse_adapter_specs(["a=x", "b.v2=y=z"]) == {"a": "x", "b.v2": "y=z"}
    with pytest.raises(WeitiaoError, match="given twice"):
        parse_adapter_specs(["a=x", "a=y"])


def test_an_adapter_folder_as_model_loads_its_base_and_talks_to_the_adapter(tiny_adapter, tiny_model):
    engine = Engine.from_model_arg(str(tiny_adapter))
    try:
        assert engine.names == [str(tiny_model), tiny_adapter.name]
        assert engine.default_model == tiny_adapter.name
    finally:
        engine.close()
