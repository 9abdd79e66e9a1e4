import pytest
import torch

from weitiao.data.collate import PadCollator
from weitiao.data.encode import IGNORE_INDEX
from weitiao.data.packing import PackedBatchSampler, PackedCollator, plan_rows


def test_rows_hold_every_example_once_within_capacity():
    lengths = [5, 9, 3, 7, 2, 8, 1, 10, 4, 6] * 20
    rows = plan_rows(lengths, capacity=16, seed=1)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
    # first fit packs tightly: close to the lower bound of sum/capacity rows
    assert len(rows) <= sum(lengths) / 16 * 1.1


def test_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="more than packing_length"):
        plan_rows([3, 20], capacity=16, seed=0)


def test_row_order_depends_on_seed_and_epoch_only():
    sampler = PackedBatchSampler([3] * 40, capacity=9, seed=7)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and second != first and sorted(map(tuple, second)) == sorted(map(tuple, first))


def test_collated_row_restarts_positions_and_masks_each_first_label():
    examples = [{"input_ids": [11, 12, 13], "labels": [11, 12, 13]}, {"input_ids": [21, 22], "labels": [-100, 22]}]
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 12, 13, IGNORE_INDEX, 22] + [IGNORE_INDEX] * 3]
    assert batch["num_tokens"] == 5


def test_scored_positions_are_those_whose_next_token_has_a_label(tiny_model_dir):
    """Only positions predicting a label pass the output layer: the logits there against `shift_labels` give the
    row's summed loss; prompt, example-boundary and padding positions are left out."""
    from transformers import AutoModelForCausalLM

    examples = [{"input_ids": [11, 12, 13, 14], "labels": [-100, -100, 13, 14]},
                {"input_ids": [21, 22, 23], "labels": [21, 22, 23]}]
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8, scored_positions=True)(examples)
    assert batch["logits_to_keep"].tolist() == [1, 2, 4, 5]  # 3 predicts 21, whose label is masked
    assert batch["shift_labels"].tolist() == [[13, 14, 22, 23]]
    assert "logits_to_keep" not in PackedCollator(0, 8, scored_positions=True)(
        [{"input_ids": [5, 6], "labels": [-100, -100]}])

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    full = model(**inputs, labels=batch["labels"], num_items_in_batch=1).loss
    kept = model(**inputs, logits_to_keep=batch["logits_to_keep"]).logits
    assert kept.shape[1] == 4
    scored = torch.nn.functional.cross_entropy(kept[0].float(), batch["shift_labels"][0], reduction="sum")
    torch.testing.assert_close(scored, full)


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tiny_model_dir):
    """Attention stays inside each example: the summed token loss and every gradient match padded batches."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    examples = []
    for length in (7, 12, 5, 9):
        ids = torch.randint(5, 1000, (length,)).tolist()
        labels = [IGNORE_INDEX] * (length // 3) + ids[length // 3:]
        examples.append({"input_ids": ids, "labels": labels})

    def loss_and_grads(batch):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
        batch = {k: v for k, v in batch.items() if k != "num_tokens"}
        loss = model(**batch, use_cache=False, num_items_in_batch=1).loss  # the sum over label tokens
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    padded_loss, padded_grads = loss_and_grads(PadCollator(0)(examples))
    packed_loss, packed_grads = loss_and_grads(PackedCollator(0, pad_to_multiple_of=16)(examples))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # without position ids the examples would see each other, and the loss would change
    leaky = PackedCollator(0)(examples)
    leaky.pop("position_ids")
    leaky_loss, _ = loss_and_grads(leaky)
    assert abs(float(leaky_loss) - float(padded_loss)) > 1e-3


def test_packed_training_run(tmp_path, tiny_model_dir):
    from tests.train.test_sft import make_config
    from weitiao.train import run

    packed = run(make_config(tmp_path / "p", tiny_model_dir, data__packing=True, data__packing_length=256,
                             train__max_steps=3))
    assert packed.steps == 3 and packed.eval_loss < packed.eval_loss_before
    assert 3 * 150 < packed.tokens <= 3 * 256  # each row: two examples of ~94 tokens, within 256
