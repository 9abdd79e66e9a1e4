import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ZH_CORPUS
from weitiao.errors import WeitiaoError
from weitiao.vocab import REPORT_FILE, extend_vocabulary
TEXTS = {
    "chinese": "当事人应当按照约定履行合同义务。投资者应当了解产品的风险。",
    "unseen chinese": "今天天气很好，我们去公园散步吧。",
    "english": "The patient should take the medicine twice a day, as the doctor said.",
    "mixed": "人工智能 (AI) 模型的效果 depends on data: 训练数据 matters!",
    "code": "def train(model, data):\n    for batch in data:\n        loss = model(batch)  # 模型\n    return loss\n",
    "spaces and digits": "  2024年1月1日  \t合同  生效\n\n",
}


@pytest.fixture
def extended(zh_extended_model_dir) -> tuple[Path, dict]:
    out = Path(zh_extended_model_dir)
    return out, json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_extension_adds_the_tokens_asked_for_and_fewer_tokens_per_character(extended, tokenizer):
    out, report = extended
    _, new = load(out)
    assert report["tokens_added"] == 60 and len(new) == len(tokenizer) + 60
    assert "当事人" in report["pieces"]
    assert report["tokens_per_char_after"] < report["tokens_per_char_before"]
    assert report["vocab_size"] == len(new)
    ids = new("当事人", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 and ids[0] >= len(tokenizer)


@pytest.mark.parametrize("name", list(TEXTS))
def test_round_trip_and_never_more_tokens(extended, tokenizer, name):
    _, new = load(extended[0])
    text = TEXTS[name]
    ids = new(text, add_special_tokens=False)["input_ids"]
    assert new.decode(ids) == text
    old = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) <= len(old)
    if all(token < len(tokenizer) for token in ids):  # no new piece applies: exactly the old tokens
        assert ids == old
    if name in ("english", "code"):
        assert ids == old
    if name == "chinese":
        assert len(ids) < len(old)


def test_new_rows_are_the_mean_of_the_rows_of_the_tokens_that_spelled_them(extended, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model, new = load(extended[0])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old_rows = base.get_input_embeddings().weight
    rows = model.get_input_embeddings().weight
    torch.testing.assert_close(rows[: len(tokenizer)], old_rows, rtol=0, atol=0)
    for piece in ("当事人", "应当"):
        new_id = new.convert_tokens_to_ids(new.tokenize(piece))[0]
        spelled = tokenizer(piece, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(rows[new_id], old_rows[spelled].mean(dim=0))
    assert model.get_output_embeddings().weight.data_ptr() == rows.data_ptr()  # still tied


def test_saved_model_reloads_with_plain_transformers_and_same_logits(extended, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, new = load(extended[0])
    batch = new(["当事人应当履行合同。", "hello world"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == len(new)
    # Text without new pieces: the same logits over the old vocabulary as the base model.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    english = new(["hello world"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**english).logits[..., : base.config.vocab_size], base(**english).logits)
    generated = model.generate(**new(["当事人"], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > 1


def test_errors_are_one_line(tmp_path, tiny_model_dir):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(WeitiaoError, match="not empty"):
        extend_vocabulary(tiny_model_dir, [str(ZH_CORPUS)], tmp_path / "full", count=10)
    with pytest.raises(WeitiaoError, match="no such file"):
        extend_vocabulary(tiny_model_dir, [str(tmp_path / "missing.txt")], tmp_path / "out", count=10)
