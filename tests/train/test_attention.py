"""Variable-length attention for packed rows: on the CPU each example runs through sdpa in turn, so these tests
check the plumbing (boundaries from the collator or from position ids, padded batches on sdpa) against padded
batches; tests/gpu/test_cuda.py checks the FlashAttention kernel itself."""

import pytest
import torch

from weitiao.data.collate import PadCollator
from weitiao.data.encode import IGNORE_INDEX
from weitiao.data.packing import PackedCollator
from weitiao.train.attention import VARLEN


def _examples():
    torch.manual_seed(0)
    examples = []
    for length in (7, 12, 5, 9):
        ids = torch.randint(5, 1000, (length,)).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 3) + ids[length // 3:]})
    return examples


def _loss_and_grads(model_dir, batch, attention):
    from weitiao.config import ModelConfig
    from weitiao.models import load_model

    model, _, _ = load_model(ModelConfig(name_or_path=model_dir, attn_implementation=attention),
                             dtype=torch.float32)
    batch = {k: v for k, v in batch.items() if k != "num_tokens"}
    loss = model(**batch, use_cache=False, num_items_in_batch=1).loss  # the sum over label tokens
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_collator_marks_where_each_example_and_the_padding_start():
    examples = [{"input_ids": [11, 12, 13], "labels": [11, 12, 13]}, {"input_ids": [21, 22], "labels": [-100, 22]}]
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8, boundaries=True)(examples)
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == 3 and batch["num_tokens"] == 5
    assert "cu_seq_lens_q" not in PackedCollator(pad_token_id=0)(examples)
    # A fixed longest example (data.max_length) for compiled code: the padding is cut into sequences that long.
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=16, boundaries=True, longest=4)(examples)
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 13, 16] and batch["max_length_q"] == 4
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]


@pytest.mark.parametrize("boundaries", [True, False], ids=["from-collator", "from-position-ids"])
def test_varlen_packed_rows_equal_padded_batches(tiny_model_dir, boundaries):
    examples = _examples()
    padded_loss, padded_grads = _loss_and_grads(tiny_model_dir, PadCollator(0)(examples), "sdpa")
    packed = PackedCollator(0, pad_to_multiple_of=16, boundaries=boundaries)(examples)
    packed_loss, packed_grads = _loss_and_grads(tiny_model_dir, packed, VARLEN)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_varlen_keeps_the_rows_of_an_unpadded_batch_apart(tiny_model_dir):
    """A batch of rows of one length (examples cut at max_length) has no padding, so transformers gives no mask and
    position ids of one row for all: each row is still its own sequence. (Before the fix the rows were read as one
    sequence, each attending to those before it: after packed training on a GPU, evaluation of long examples
    reported 2.18 where sdpa gave 1.68.)"""
    examples = [{"input_ids": e["input_ids"][:5], "labels": e["labels"][:5]} for e in _examples()]
    batch = PadCollator(0)(examples)
    assert batch["attention_mask"].all()
    torch.testing.assert_close(_loss_and_grads(tiny_model_dir, batch, VARLEN)[0],
                               _loss_and_grads(tiny_model_dir, batch, "sdpa")[0])


def test_varlen_model_runs_padded_batches_and_generation_on_sdpa(tiny_model_dir):
    """Evaluation and generation batches are padded: the varlen model uses transformers' mask there."""
    examples = _examples()
    padded = PadCollator(0)(examples)
    torch.testing.assert_close(_loss_and_grads(tiny_model_dir, padded, VARLEN)[0],
                               _loss_and_grads(tiny_model_dir, padded, "sdpa")[0])

    from weitiao.config import ModelConfig
    from weitiao.models import load_model

    outputs = []
    for attention in (VARLEN, "sdpa"):
        model, _, _ = load_model(ModelConfig(name_or_path=tiny_model_dir, attn_implementation=attention))
        prompt = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
        outputs.append(model.generate(prompt, attention_mask=(prompt != 0).long(), max_new_tokens=6,
                                      do_sample=False, pad_token_id=0))
    assert torch.equal(outputs[0], outputs[1])


def test_packed_training_follows_sdpa_losses_without_searching_for_examples(tmp_path, tiny_model_dir, monkeypatch):
    """The training loop hands varlen the collator's boundaries (under PACKED_VARLEN, with no mask): every step's
    loss is that of sdpa with transformers' own packed-sequence mask, but transformers never searches the position
    ids for the examples (on a GPU a host-GPU sync per forward). The returned model is on varlen again, which serves
    padded batches. (Flex attention has no backward on a CPU: the next test and tests/gpu cover it.)"""
    import json

    import transformers.masking_utils as masking

    from tests.train.test_sft import make_config
    from weitiao.train import run

    searches = []
    search = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda ids: searches.append(ids) or search(ids))
    losses, searched = {}, {}
    for attention in ("sdpa", VARLEN):
        searches.clear()
        result = run(make_config(tmp_path / attention, tiny_model_dir, data__packing=True, data__packing_length=256,
                                 model__attn_implementation=attention, train__max_steps=3))
        searched[attention] = len(searches)
        assert result.model.config._attn_implementation == attention
        lines = (tmp_path / attention / "out" / "metrics.jsonl").read_text().splitlines()
        losses[attention] = [json.loads(line)["loss"] for line in lines if '"loss"' in line] + [result.eval_loss]
    assert len(losses["sdpa"]) == 4 and searched["sdpa"] >= 3
    assert searched[VARLEN] == 0
    assert losses[VARLEN] == pytest.approx(losses["sdpa"], rel=1e-5)


def test_flex_attention_on_the_loops_block_mask_gives_the_packed_sdpa_loss(tiny_model_dir, monkeypatch):
    """The block mask the training loop builds for flex attention: the loss of transformers' own packed-sequence
    mask on sdpa, and transformers takes it as it is (no search of the position ids)."""
    import transformers.masking_utils as masking

    from weitiao.config import ModelConfig
    from weitiao.models import load_model
    from weitiao.train.attention import packed_rows_block_mask

    packed = PackedCollator(0, pad_to_multiple_of=16)(_examples())
    del packed["num_tokens"]
    losses = {}
    for attention in ("sdpa", "flex_attention"):
        model, _, _ = load_model(ModelConfig(name_or_path=tiny_model_dir, attn_implementation=attention))
        if attention == "flex_attention":
            packed["attention_mask"] = packed_rows_block_mask(packed["position_ids"])
            monkeypatch.setattr(masking, "find_packed_sequence_indices", None)  # calling it would fail
        with torch.no_grad():
            losses[attention] = model(**packed, use_cache=False).loss
    torch.testing.assert_close(losses["flex_attention"], losses["sdpa"], rtol=1e-5, atol=1e-5)


def test_packed_rows_block_mask_is_causal_within_each_example():
    from torch.nn.attention.flex_attention import create_mask

    from weitiao.train.attention import packed_rows_block_mask

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [5, 6, 7, 0, 1, 2, 3, 0]])  # row 2 starts mid-document
    dense = create_mask(packed_rows_block_mask(positions).mask_mod, 2, 1, 8, 8)[:, 0]
    examples = [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 1, 1, 2]]
    for row, owners in zip(dense, examples):
        owner = torch.tensor(owners)
        expected = (owner[:, None] == owner[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
        assert torch.equal(row, expected)


def test_packed_varlen_refuses_a_batch_without_boundaries(tiny_model_dir):
    """PACKED_VARLEN builds no padding mask: a padded batch under it must fail, not attend to the padding."""
    from weitiao.config import ModelConfig
    from weitiao.models import load_model
    from weitiao.train.attention import PACKED_VARLEN, register_varlen_attention

    register_varlen_attention()
    model, _, _ = load_model(ModelConfig(name_or_path=tiny_model_dir))
    model.set_attn_implementation(PACKED_VARLEN)
    batch = PadCollator(0)(_examples())
    with pytest.raises(ValueError, match="boundaries"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_packed_rows_take_varlen_only_for_plain_causal_attention_uncompiled_where_it_runs():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    from weitiao.train import attention

    for plain in (LlamaConfig(), Qwen2Config()):  # varlen_runs: a GPU of compute capability 8.0+, bf16/fp16
        assert attention.packed_row_attention(plain, varlen_runs=True, compiled=False) == VARLEN
        assert attention.packed_row_attention(plain, varlen_runs=True, compiled=True) == "flex_attention"
        assert attention.packed_row_attention(plain, varlen_runs=False, compiled=False) == "flex_attention"
    for windowed in (MistralConfig(sliding_window=4096), Gemma2Config()):  # transformers does these for flex
        assert attention.packed_row_attention(windowed, varlen_runs=True, compiled=False) == "flex_attention"


def test_varlen_refuses_attention_it_does_not_implement():
    """Both varlen paths, the model's attention function and the checkpointed graphs' kept-output forward, refuse
    soft-capping and sliding windows instead of computing plain causal attention in their place."""
    from weitiao.train.attention import keeps_attention_output, varlen_attention_forward, varlen_forward_keeping

    q = torch.zeros(1, 2, 4, 8)
    boundaries = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="flex_attention"):
        varlen_attention_forward(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=boundaries, softcap=50.0)
    with pytest.raises(ValueError, match="sliding window"):
        varlen_attention_forward(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=boundaries, sliding_window=2)
    if keeps_attention_output():  # torch >= 2.11
        for unsupported in ({"softcap": 50.0}, {"sliding_window": 2}):
            with pytest.raises(ValueError, match="flex_attention"):
                varlen_forward_keeping(q, q, q, None, cu_seq_lens_q=boundaries, **unsupported)
