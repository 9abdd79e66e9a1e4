"""The generation engine on a CUDA GPU (skipped elsewhere): decode steps replayed from CUDA graphs, rows of the
base model and of two LoRA adapters in one batch, requests joining a running batch. Every reply must be the text
plain PeftModel.generate gives for that prompt alone, on the same GPU in the same dtype."""

import threading
import time

import pytest
import torch

from tests.conftest import make_lora_adapter, make_tiny_model
from tests.generation.test_engine import QUESTIONS, peft_greedy
from weitiao.generation.engine import Engine
from weitiao.generation.requests import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("engine-gpu")
    base = make_tiny_model(folder / "base", tokenizer, hidden_size=128, weight_std=0.5)
    return base, {"tuned": make_lora_adapter(folder / "tuned", base, template="dolly", seed=1),
                  "second": make_lora_adapter(folder / "second", base, seed=7)}


def expected(models, model: str, question: str) -> str:
    base, adapters = models
    template_of = adapters.get(model, base)
    return peft_greedy(base, adapters, None if model == "base" else model, question, template_of, device="cuda",
                       max_new_tokens=GREEDY.max_tokens)


def test_cuda_graph_batches_of_base_and_adapters_give_plain_peft_text(models):
    base, adapters = models
    engine = Engine.load(str(base), adapters, base_name="base", dtype="fp32", device="cuda")
    try:
        assert engine._batch.cuda_graphs and engine._batch.captured > 10
        jobs = [(model, question) for question in QUESTIONS for model in ("base", "tuned", "second")]
        generations = [engine.chat(model, [{"role": "user", "content": q}], GREEDY) for model, q in jobs]
        replies = {job: g.result() for job, g in zip(jobs, generations)}
        # Requests that join a running batch at different times, from several threads.
        late: dict = {}

        def ask(job, delay):
            time.sleep(delay)
            late[job] = engine.chat(job[0], [{"role": "user", "content": job[1]}], GREEDY).result()

        threads = [threading.Thread(target=ask, args=(job, 0.01 * i)) for i, job in enumerate(reversed(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        engine.close()
    assert late == replies
    for model, question in jobs:
        assert replies[model, question] == expected(models, model, question), (model, question)
    for question in QUESTIONS:  # the three models answer differently, so a row given the wrong adapter shows
        assert len({replies[model, question] for model in ("base", "tuned", "second")}) == 3


def test_attaching_an_adapter_while_serving_recaptures_the_graphs(models):
    base, adapters = models
    engine = Engine.load(str(base), base_name="base", dtype="fp32", device="cuda")
    try:
        question = QUESTIONS[0]
        running = engine.chat("base", [{"role": "user", "content": question}], SamplingParams(max_tokens=200,
                                                                                              temperature=0))
        next(iter(running))
        engine.add_adapter("second", adapters["second"])
        reply = engine.chat("second", [{"role": "user", "content": question}], GREEDY).result()
        assert running.result() == expected_long(models, question)
    finally:
        engine.close()
    assert reply == expected(models, "second", question)


def expected_long(models, question: str) -> str:
    base, adapters = models
    return peft_greedy(base, adapters, None, question, base, device="cuda", max_new_tokens=200)
