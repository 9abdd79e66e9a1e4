from tests.conftest import write_jsonl
from weitiao.config import DataConfig
from weitiao.data.blocks import DocumentBlockCollator, pack_blocks
from weitiao.data.dataset import build_datasets
from weitiao.data.encode import IGNORE_INDEX

EOS = 2


def split_at_eos(ids: list[int]) -> list[list[int]]:
    documents, current = [], []
    for token in ids:
        current.append(token)
        if token == EOS:
            documents.append(current)
            current = []
    assert not current, "the stream does not end with EOS"
    return documents


def concatenated(blocks) -> list[int]:
    return [token for block in blocks for token in block["input_ids"]]


def test_blocks_hold_every_token_once_in_order_and_record_document_pieces():
    documents = [[10, 11, EOS], [20, 21, 22, 23, 24, 25, 26, EOS], [30, EOS], [40, 41, 42, 43, EOS]]
    blocks = list(pack_blocks(documents, 4))
    assert concatenated(blocks) == [token for document in documents for token in document]
    assert [len(block["input_ids"]) for block in blocks] == [4, 4, 4, 4, 2]  # only the last is short
    assert blocks[0] == {"input_ids": [10, 11, EOS, 20], "labels": [10, 11, EOS, 20], "segment_lengths": [3, 1]}
    assert blocks[1]["segment_lengths"] == [4]  # the middle of document 2
    assert blocks[2] == {"input_ids": [25, 26, EOS, 30], "labels": [25, 26, EOS, 30], "segment_lengths": [3, 1]}
    for block in blocks:
        assert sum(block["segment_lengths"]) == len(block["input_ids"])
    assert list(pack_blocks([[1, EOS], [3, EOS]], 4)) == [
        {"input_ids": [1, EOS, 3, EOS], "labels": [1, EOS, 3, EOS], "segment_lengths": [2, 2]}]


def test_packed_blocks_keep_attention_and_labels_within_documents():
    blocks = list(pack_blocks([[10, 11, EOS], [20, 21, 22, 23, EOS]], 4))
    batch = DocumentBlockCollator(pad_token_id=0)(blocks)
    assert batch["input_ids"].tolist() == [[10, 11, EOS, 20, 21, 22, 23, EOS]]
    # Positions restart at each document and at each block (a block cannot see the previous one).
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    # No token is trained to predict the start of a document piece: its first label is masked.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 11, EOS, IGNORE_INDEX, IGNORE_INDEX, 22, 23, EOS]]
    assert batch["num_tokens"] == 8
    padded = DocumentBlockCollator(pad_token_id=0, pad_to_multiple_of=4)(blocks[1:])
    assert padded["input_ids"].shape == (1, 4) and padded["num_tokens"] == 4


def write_text_corpus(path, count: int, prefix: str = "") -> list[str]:
    paragraphs = [f"{prefix}第{i}段：合同当事人应当履行义务 number {i}." + " 句子" * (i % 7) for i in range(count)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return paragraphs


def test_pt_dataset_has_eos_after_every_document_and_all_tokens_as_labels(tmp_path, tokenizer):
    paragraphs = write_text_corpus(tmp_path / "corpus.txt", 20)
    train, _, stats = build_datasets(DataConfig(train=[str(tmp_path / "corpus.txt")], max_length=32), tokenizer,
                                     stage="pt")
    assert stats["train"]["documents"] == 20 and stats["train"]["characters"] == sum(map(len, paragraphs))
    assert all(len(ids) == 32 for ids in train["input_ids"][:-1])
    assert all(row["labels"] == row["input_ids"] for row in train)
    documents = split_at_eos(concatenated(train))
    # Documents are shuffled before packing; each is exactly its text's tokens plus EOS.
    decoded = sorted(tokenizer.decode(document[:-1]) for document in documents)
    assert decoded == sorted(paragraphs)


def test_chat_data_mixed_into_pt_is_rendered_and_ends_with_its_end_of_turn(tmp_path, tokenizer):
    write_text_corpus(tmp_path / "corpus.txt", 3)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"question": "你好？", "answer": "你好！"}])
    train, _, _ = build_datasets(DataConfig(train=[str(tmp_path / "corpus.txt"), str(chat)], max_length=512),
                                 tokenizer, stage="pt")
    stream = tokenizer.decode(concatenated(train))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "你好？"},
                                              {"role": "assistant", "content": "你好！"}], tokenize=False)
    # SmolLM2's EOS is its end-of-turn token: the conversation already ends with it, so no second one is added,
    # and the newline the template puts after the last turn is dropped.
    conversation = rendered.rstrip()
    assert conversation.endswith("你好！<|im_end|>") and conversation in stream
    following = stream[stream.index(conversation) + len(conversation):][:1]
    assert following in ("", "第")
    assert all(row["labels"] == row["input_ids"] for row in train)


def test_streaming_a_file_larger_than_a_batch_gives_the_same_documents(tmp_path, tokenizer):
    from torch.utils.data import DataLoader

    from weitiao.data.collate import PadCollator
    from weitiao.data.dataset import stream_documents

    corpus = tmp_path / "corpus.txt"
    write_text_corpus(corpus, 300)
    held_out = tmp_path / "eval.txt"
    write_text_corpus(held_out, 3)
    settings = dict(train=[str(corpus)], eval=[str(held_out)], max_length=64, cache=False)
    in_memory, _, _ = build_datasets(DataConfig(**settings), tokenizer, stage="pt")
    data = DataConfig(**settings, streaming=True)
    streamed, evaluation, stats = build_datasets(data, tokenizer, stage="pt")
    assert stats["streamed"] == [str(corpus)] and stats["eval"]["documents"] == 3 and len(evaluation) >= 1
    # In memory, documents are shuffled and then packed; streamed, they are packed in file order and the blocks
    # are shuffled in a buffer. Either way every document is read once, whole.
    documents = [tuple(ids) for ids in stream_documents(data, tokenizer, seed=42)]
    assert sorted(documents) == sorted(map(tuple, split_at_eos(concatenated(in_memory))))
    unshuffled = list(pack_blocks(map(list, documents), 64))
    blocks = list(streamed)
    assert len(blocks) == len(in_memory) > 100  # many batches' worth
    assert sorted(tuple(b["input_ids"]) for b in blocks) == sorted(tuple(b["input_ids"]) for b in unshuffled)
    assert [tuple(b["input_ids"]) for b in blocks] != [tuple(b["input_ids"]) for b in unshuffled]
    batches = list(DataLoader(streamed, batch_size=8, collate_fn=PadCollator(tokenizer.pad_token_id)))
    assert len(batches) == -(-len(blocks) // 8)
    assert sum(batch["num_tokens"] for batch in batches) == sum(len(ids) for ids in in_memory["input_ids"])


def test_streaming_applies_source_weights_per_record(tmp_path, tokenizer):
    from weitiao.data.dataset import stream_documents

    write_text_corpus(tmp_path / "a.txt", 40, prefix="甲")
    write_text_corpus(tmp_path / "b.txt", 40, prefix="乙")
    data = DataConfig(train=[{"path": str(tmp_path / "a.txt"), "weight": 2},
                             {"path": str(tmp_path / "b.txt"), "weight": 0.5}], max_length=64, streaming=True)
    texts = [tokenizer.decode(document[:-1]) for document in stream_documents(data, tokenizer, seed=0)]
    from_a = [text for text in texts if text.startswith("甲")]
    from_b = [text for text in texts if text.startswith("乙")]
    assert len(from_a) == 80 and len(set(from_a)) == 40  # two whole passes
    assert 10 <= len(from_b) <= 30 and len(set(from_b)) == len(from_b)  # about half, each at most once
    assert all(first != second for first, second in zip(texts, texts[1:], strict=False))  # never side by side
    # Interleaved, not one source after the other: b's documents are spread over the stream.
    positions = [index for index, text in enumerate(texts) if text.startswith("乙")]
    assert positions[0] < len(texts) / 4 and positions[-1] > len(texts) / 2
