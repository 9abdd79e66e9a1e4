"""Stages dpo, kto and rm: the losses against their formulas, the reference model, resume, the saved reward model."""

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_interrupted, write_jsonl
from weitiao.config import PreferenceConfig, load_config
from weitiao.data.collate import PadCollator
from weitiao.data.encode import IGNORE_INDEX
from weitiao.data.packing import PackedCollator
from weitiao.data.preference import PairCollator, encode_pair
from weitiao.eval.pairs import sequence_logps
from weitiao.train import run
from weitiao.train.preference import kto_losses, pair_losses


def pair_rows(n: int, offset: int = 0) -> list[dict]:
    """Sums: the chosen reply is right, the rejected one is off by one."""
    return [{"instruction": f"What is {i} plus {i}?", "input": "", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"}
            for i in range(offset, offset + n)]


def make_config(tmp_path, model_dir, stage="dpo", **overrides):
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(24))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", pair_rows(8, offset=100))
    settings = {"stage": stage, "model": {"name_or_path": model_dir},
                "data": {"train": str(train), "eval": str(evaluation), "max_length": 64, "cache": False},
                "lora": {"r": 4, "alpha": 8},
                "train": {"output_dir": str(tmp_path / "out"), "max_steps": 6, "per_device_train_batch_size": 4,
                          "learning_rate": 1e-2, "logging_steps": 1, "lr_scheduler_type": "constant"},
                "eval": {"compare": False}}
    for name, value in overrides.items():
        section, _, key = name.rpartition("__")
        (settings.setdefault(section, {}) if section else settings)[key] = value
    return load_config(None, settings)


def encoded_pairs(tokenizer, rows: list[dict], swap: bool = False) -> list[dict]:
    pairs = []
    for row in rows:
        chosen, rejected = (row["rejected"], row["chosen"]) if swap else (row["chosen"], row["rejected"])
        messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": chosen}]
        pairs.append(encode_pair(tokenizer, messages, rejected, 64, "right")[0])
    return pairs


def batch_of(tokenizer, rows: list[dict], swap: bool = False) -> dict:
    return PairCollator(PadCollator(tokenizer.pad_token_id))(encoded_pairs(tokenizer, rows, swap))


def full_logits_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probs of each row's label tokens, the plain way: every logit, log-softmax, gather."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    logps = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * (targets != IGNORE_INDEX)).sum(-1)


def test_reply_log_probs_equal_the_full_logits_computation_padded_and_packed(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    padded = batch_of(tokenizer, pair_rows(3))
    with torch.no_grad():
        expected = full_logits_logps(model, padded)
        logps, lengths = sequence_logps(model, padded)
        torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-4)
        assert lengths.tolist() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum(-1).tolist()
        packed = PairCollator(PackedCollator(tokenizer.pad_token_id, pad_to_multiple_of=16))(
            encoded_pairs(tokenizer, pair_rows(3)))
        torch.testing.assert_close(sequence_logps(model, packed)[0], expected, rtol=1e-5, atol=1e-4)
    assert model.get_output_embeddings() is model.lm_head and isinstance(model.lm_head, torch.nn.Linear)


def test_losses_equal_their_formulas():
    chosen, rejected = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -7.0])
    reference = torch.tensor([[-5.0, -5.5], [-8.0, -8.5]])
    lengths = torch.tensor([[2.0, 3.0], [4.0, 2.0]])
    # DPO (Rafailov et al. eq. 7): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    losses, reward_c, reward_r = pair_losses(PreferenceConfig(loss="sigmoid", beta=0.1), chosen, rejected, lengths,
                                             reference)
    assert losses[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * ((-4 + 5) - (-6 + 5.5))))))
    assert reward_c.tolist() == pytest.approx([0.1, -0.1]) and reward_r.tolist() == pytest.approx([-0.05, 0.15])
    # IPO: (h - 1/(2 beta))^2 with h on per-token log-ratios
    losses, _, _ = pair_losses(PreferenceConfig(loss="ipo", beta=0.5), chosen, rejected, lengths, reference)
    h = (-4 / 2 - -6 / 3) - (-5 / 2 - -5.5 / 3)
    assert losses[0].item() == pytest.approx((h - 1) ** 2)
    # SimPO: -log sigmoid(beta * (mean_c - mean_r) - gamma), gamma = 0.5 beta
    losses, _, _ = pair_losses(PreferenceConfig(loss="simpo", beta=2.0), chosen, rejected, lengths, None)
    assert losses[1].item() == pytest.approx(-math.log(1 / (1 + math.exp(-(2 * (-9 / 4 - -7 / 2) - 1)))))
    # ORPO: NLL of the chosen reply (per token) - lambda * log sigmoid(log odds ratio)
    losses, _, _ = pair_losses(PreferenceConfig(loss="orpo", beta=0.1), chosen, rejected, lengths, None)
    c, r = -4 / 2, -6 / 3
    odds = math.log(math.exp(c) / (1 - math.exp(c))) - math.log(math.exp(r) / (1 - math.exp(r)))
    assert losses[0].item() == pytest.approx(2 - 0.1 * math.log(1 / (1 + math.exp(-odds))), rel=1e-5)
    # KTO: 1 - sigmoid(beta (r - z0)) for desirable, 1 - sigmoid(beta (z0 - r)) for undesirable; z0 = max(0, KL)
    losses, _ = kto_losses(PreferenceConfig(beta=0.1), torch.tensor([2.0, 1.0]), torch.tensor([0.5, 1.5]),
                           torch.tensor([True, False]))
    assert losses.tolist() == pytest.approx([1 - 1 / (1 + math.exp(-0.1 * (2 - 1))),
                                             1 - 1 / (1 + math.exp(-0.1 * (1 - 1)))])


def test_a_swapped_pair_flips_the_sign_of_the_margin(tmp_path, tiny_model_dir, tokenizer):
    from weitiao.train.preference import PairLoss

    result = run(make_config(tmp_path, tiny_model_dir, pref__loss="simpo"))  # no reference: the policy alone
    objective = PairLoss(PreferenceConfig(loss="simpo", beta=2.0), None, nullcontext)
    model = result.model.eval()
    with torch.no_grad():
        _, chosen, rejected = objective.scores(model, batch_of(tokenizer, pair_rows(4, offset=100)))
        _, swapped_chosen, swapped_rejected = objective.scores(model, batch_of(tokenizer, pair_rows(4, offset=100),
                                                                                swap=True))
    torch.testing.assert_close(chosen - rejected, -(swapped_chosen - swapped_rejected))
    assert (chosen - rejected).abs().min() > 0


def test_lora_dpo_learns_the_pairs_and_keeps_the_reference_fixed(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    batch = batch_of(tokenizer, pair_rows(8, offset=100))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        before = sequence_logps(base, batch)[0]
    result = run(make_config(tmp_path, tiny_model_dir))
    model = result.model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            reference_after = sequence_logps(model, batch)[0]
        policy = sequence_logps(model, batch)[0]
    torch.testing.assert_close(reference_after, before, rtol=1e-5, atol=1e-4)  # the reference never moved
    assert (policy - before).abs().max() > 1e-2  # the policy did
    log = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_reward_accuracy" in r]
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at the start
    assert evals[-1]["eval_reward_accuracy"] > 50 and evals[-1]["eval_reward_margin"] > 0
    assert all("rewards/margin" in r for r in log if "loss" in r)


def test_full_dpo_with_a_frozen_copy_equals_precomputed_reference_log_probs(tmp_path, tiny_model_dir):
    copied = run(make_config(tmp_path / "copy", tiny_model_dir, method="full", train__learning_rate=1e-4))
    precomputed = run(make_config(tmp_path / "pre", tiny_model_dir, method="full", train__learning_rate=1e-4,
                                  pref__precompute_reference=True))
    losses = [[r["loss"] for r in json.loads("[" + ",".join(Path(result.output_dir, "metrics.jsonl").read_text()
                                                           .splitlines()) + "]") if "loss" in r]
              for result in (copied, precomputed)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert losses[0][0] == pytest.approx(math.log(2), abs=1e-4) and losses[0][-1] < losses[0][0]


def test_dpo_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    # One CPU thread in both runs: a thread count measured per run (weitiao.cpu) can differ under load, and with it
    # the order of the products' sums.
    settings = dict(train__save_steps=3, train__per_device_train_batch_size=2, train__gradient_accumulation_steps=2,
                    train__cpu_threads=1)
    reference = run(make_config(tmp_path / "whole", tiny_model_dir, **settings))
    config = make_config(tmp_path / "split", tiny_model_dir, **settings)
    run_interrupted(config, step=4)
    resumed = run(config, resume=True)
    expected = load_file(str(Path(reference.output_dir) / "adapter_model.safetensors"))
    got = load_file(str(Path(resumed.output_dir) / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


def test_kto_trains_on_feedback(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i + i % 2}"}], "label": i % 2 == 0}
            for i in range(32)]
    train, evaluation = write_jsonl(tmp_path / "k.jsonl", rows[:24]), write_jsonl(tmp_path / "ke.jsonl", rows[24:])
    config = make_config(tmp_path, tiny_model_dir, stage="kto", data__train=str(train), data__eval=str(evaluation))
    result = run(config)
    log = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["eval_loss"] == pytest.approx(0.5, abs=1e-4)  # sigmoid(0) at the start: policy = reference
    assert "rewards/desirable" in log[1] and result.eval_loss < 0.5


def test_reward_model_loads_in_plain_transformers_and_ranks_a_hand_made_pair(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from weitiao.eval.compare import compare_run

    rows = [{"instruction": f"Review {i}", "input": "", "chosen": "great great great", "rejected": "awful awful"}
            for i in range(24)]
    train = write_jsonl(tmp_path / "rm.jsonl", rows)
    config = make_config(tmp_path, tiny_model_dir, stage="rm", data__train=str(train), train__max_steps=10,
                         data__eval=str(write_jsonl(tmp_path / "rme.jsonl", rows[:4])))
    result = run(config)
    out = Path(result.output_dir)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert not (out / "README.md").exists()  # PEFT's card of the adapter that is no more
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1

    def reward(reply: str) -> float:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Review 999"},
                                              {"role": "assistant", "content": reply}], tokenize=False)
        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()

    assert reward("great great great") > reward("awful awful")
    report = compare_run(out, config)
    assert report["metrics"]["pair_accuracy"]["tuned"] == 100.0
    assert F.logsigmoid(torch.tensor(reward("great great great") - reward("awful awful"))) > -0.69
    # `weitiao data select --method quality --scorer RUN` keeps what the reward model prefers.
    from weitiao.config import SelectConfig
    from weitiao.data.dataset import load_source
    from weitiao.data.select import select_examples

    data = write_jsonl(tmp_path / "sft.jsonl", [{"question": f"Review {i}", "answer": reply}
                                                for i, reply in enumerate(["awful awful", "great great great"] * 3)])
    examples, _ = load_source(load_config(None, {"data": {"train": str(data)}}).data.train[0])
    selection = select_examples(examples, SelectConfig(method="quality", count=3, scorer=str(out), cache=False))
    assert selection.selected == [1, 3, 5]


def test_dpo_after_sft_starts_from_the_sft_adapter_as_its_reference(tmp_path, tiny_model_dir):
    """SFT on the chosen replies, then DPO continuing its adapter: the reference is the SFT model (log-probs
    precomputed), so the first held-out loss is log 2; with the base as reference it would not be."""
    sft = run(make_config(tmp_path / "sft", tiny_model_dir, stage="sft", train__max_steps=4))
    dpo = run(make_config(tmp_path / "dpo", tiny_model_dir, model__adapter=sft.output_dir, train__max_steps=4))
    log = [json.loads(line) for line in (Path(dpo.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert dpo.eval_loss < log[0]["eval_loss"]
    with pytest.raises(Exception, match="stage kto cannot continue an adapter"):
        make_config(tmp_path / "kto", tiny_model_dir, stage="kto", model__adapter=sft.output_dir)


def test_compiled_dpo_trains_the_same_adapter_as_eager(tmp_path, tiny_model_dir):
    """Regional compilation wraps the output head too; the replies are still scored through its plain module."""
    from safetensors.torch import load_file

    settings = dict(train__max_steps=2, train__optim="sgd", train__learning_rate=0.5)
    eager = run(make_config(tmp_path / "eager", tiny_model_dir, **settings))
    compiled = run(make_config(tmp_path / "compiled", tiny_model_dir, train__torch_compile=True, **settings))
    first = load_file(str(Path(eager.output_dir) / "adapter_model.safetensors"))
    second = load_file(str(Path(compiled.output_dir) / "adapter_model.safetensors"))
    assert sorted(first) == sorted(second)
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-3, atol=1e-5)
    assert any((weight != 0).any() for name, weight in second.items() if "lora_B" in name)
