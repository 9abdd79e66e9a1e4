from __future__ import annotations

import threading

import pytest
import torch

from tests.conftest import make_lora_adapter
from weitiao.errors import WeitiaoError
from weitiao.generation.engine import Engine, parse_adapter_specs
from weitiao.generation.requests import ContextLengthError, EngineBusyError, SamplingParams, UnknownModelError

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
    plain = Engine.load(str(tiny_model))  # no adapter attached at all
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
    # Attaching the same folder under its name again (a reloaded web page does) is the adapter already there.
    assert engine.add_adapter("tuned", tiny_adapter) is engine.get("tuned")
    second = make_lora_adapter(tmp_path / "second", tiny_model, seed=2)
    for taken in ("tuned", "base"):
        with pytest.raises(WeitiaoError, match="already taken"):
            engine.add_adapter(taken, second)
    other = Engine.load(str(other_tiny_model))
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


GREEDY = SamplingParams(max_tokens=16, temperature=0)
QUESTIONS = ["Hello, who are you?", "What is the capital of France?", "Write a haiku about rain.",
             "List three prime numbers."]


def peft_greedy(tiny_model, adapters: dict, name: str | None, question: str, template_of, device: str = "cpu",
                max_new_tokens: int = 16) -> str:
    """The reply of plain PeftModel.generate (transformers' own loop, one prompt, no engine)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from weitiao.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(device)
    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(model, str(path), adapter_name=first)
    for other, other_path in rest:
        model.load_adapter(str(other_path), adapter_name=other)
    tokenizer = load_tokenizer(str(template_of))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"].to(device)
    if name is None:
        with model.disable_adapter():
            output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    else:
        model.set_adapter(name)
        output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    eos = tokenizer.eos_token_id
    reply = [t for t in output[0, ids.shape[1]:].tolist()]
    reply = reply[:reply.index(eos)] if eos in reply else reply
    return tokenizer.decode(reply, skip_special_tokens=True)


def test_one_batch_of_base_and_two_adapters_gives_plain_peft_greedy_text(tiny_model, tiny_adapter, tmp_path):
    second = make_lora_adapter(tmp_path / "second", tiny_model, seed=7)  # the default model's chat template
    adapters = {"tuned": tiny_adapter, "second": second}
    engine = Engine.load(str(tiny_model), adapters, base_name="base")
    try:
        jobs = [(model, question) for question in QUESTIONS for model in ("base", "tuned", "second")]
        # Submitted together, they run in one batch: rows of all three models in every decode step.
        generations = [engine.chat(model, [{"role": "user", "content": q}], GREEDY) for model, q in jobs]
        replies = {job: g.result() for job, g in zip(jobs, generations)}
    finally:
        engine.close()
    for model, question in jobs:
        folder = {"base": tiny_model, "tuned": tiny_adapter, "second": second}[model]
        expected = peft_greedy(tiny_model, adapters, None if model == "base" else model, question, folder)
        assert replies[model, question] == expected, (model, question)
    for question in QUESTIONS:  # the three models answer differently, so a row given the wrong adapter shows
        assert len({replies[model, question] for model in ("base", "tuned", "second")}) == 3


def test_new_requests_join_a_running_batch(engine):
    long = engine.chat("base", HELLO, sampled(seed=8, max_tokens=300))
    next(iter(long))
    short = engine.chat("tuned", HELLO, sampled(seed=9, max_tokens=5))
    assert short.result() and short.done.is_set()
    assert not long.done.is_set()  # the short reply came and went while the long one kept decoding
    assert short.started >= long.started and short.first_token_at < long.created + 300
    long.cancel()
    assert long.done.wait(timeout=30) and long.completion_tokens < 300


def test_queue_counts_every_prompt_and_cancelled_requests_free_their_place(tiny_model):
    engine = Engine.load(str(tiny_model), max_batch=1, max_queue=2)
    name = engine.default_model
    try:
        running = engine.complete(name, "one two three", sampled(seed=1, max_tokens=400))
        next(iter(running))  # it holds the only row
        waiting = engine.submit(name, ["a", "b"], sampled(seed=2), chat=False)
        assert engine.queued == 2
        with pytest.raises(EngineBusyError, match="2 requests waiting, at most 2"):
            engine.submit(name, ["c"], sampled(seed=3), chat=False)
        waiting[0].cancel()
        assert engine.queued == 1
        with pytest.raises(EngineBusyError):  # all or none: two more do not fit, and neither is queued
            engine.submit(name, ["c", "d"], sampled(seed=3), chat=False)
        assert engine.queued == 1
        late = engine.submit(name, ["c"], sampled(seed=3, max_tokens=4), chat=False)[0]
        running.cancel()
        assert late.result() and waiting[1].result() and waiting[0].text == ""
    finally:
        engine.close()


@pytest.mark.parametrize("seed", [-1, 2**63])
def test_seeds_out_of_range_are_refused(seed):
    with pytest.raises(WeitiaoError, match="seed must be between 0 and"):
        SamplingParams(seed=seed)


def test_when_cuda_graphs_cannot_be_captured_the_engine_decodes_without_them(tiny_model, caplog):
    """Capturing fails (here: no CUDA at all; on a GPU: no memory left for the graphs): a warning, then the same
    replies from eager decode steps, instead of every request failing."""
    eager = Engine.load(str(tiny_model))
    forced = Engine.load(str(tiny_model), cuda_graphs=True)
    try:
        assert not forced._batch.cuda_graphs and "decoding without CUDA graphs" in caplog.text
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=3)
        assert forced.chat(forced.default_model, HELLO, params).result() == \
            eager.chat(eager.default_model, HELLO, params).result()
    finally:
        forced.close()
        eager.close()


def test_decode_graphs_are_captured_without_autograd(tiny_model, monkeypatch):
    """The warm-up and captured steps write the KV cache from the model's outputs: with autograd on, each write
    chains that step's activations to the cache, and capturing every bucket of a 1B model ran a GPU out of
    memory that way (H200, run27). Capturing itself needs CUDA; what it runs under is checked here."""
    from weitiao.generation import batch

    modes: list[bool] = []
    monkeypatch.setattr(batch.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(batch.torch.cuda, "Stream", lambda device=None: None)
    monkeypatch.setattr(batch.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(batch.BatchModel, "_capture",
                        lambda self, rows, length: modes.append(torch.is_inference_mode_enabled()))
    engine = Engine.load(str(tiny_model), cuda_graphs=True, max_batch=4, max_model_len=512)
    engine.close()
    assert len(modes) == 3 * 2 and all(modes)  # batch buckets 1, 2, 4 x lengths 256, 512


def test_grouped_decode_attention_equals_transformers_sdpa():
    """One-token queries of a grouped-query model read the cached keys in place; the numbers are sdpa's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from weitiao.generation.batch import grouped_sdpa_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, False
    query = torch.randn(4, 9, 1, 16)
    cache = torch.randn(2, 4, 3, 40, 16)  # keys and values of 4 rows, 3 kv heads, a longer cache than attended
    keys, values = cache[0, :, :, :25], cache[1, :, :, :25]  # views, as SlotCache returns them
    mask = torch.arange(25)[None, :] <= torch.tensor([3, 10, 24, 0])[:, None]
    mask = mask[:, None, None, :]
    ours, _ = grouped_sdpa_attention(module, query, keys, values, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (4, 1, 9, 16)
    torch.testing.assert_close(ours, theirs)
    prompt = torch.randn(1, 9, 5, 16)  # a prefill (several query positions) is sdpa's own path
    torch.testing.assert_close(grouped_sdpa_attention(module, prompt, keys[:1], values[:1], None, scaling=0.25)[0],
                               sdpa_attention_forward(module, prompt, keys[:1], values[:1], None, scaling=0.25)[0])


def test_packed_cpu_linears_give_the_same_logits(tiny_model):
    from transformers import AutoModelForCausalLM

    from weitiao.generation.batch import pack_linears_for_cpu

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    inputs = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        before = model(inputs).logits
        weights = [module.weight.clone() for module in model.modules() if isinstance(module, torch.nn.Linear)]
        packed = pack_linears_for_cpu(model)
        after = model(inputs).logits
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    assert packed == len(weights) > 0
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    assert all(torch.equal(module.weight, weight) for module, weight in
               zip([m for m in model.modules() if isinstance(m, torch.nn.Linear)], weights))
