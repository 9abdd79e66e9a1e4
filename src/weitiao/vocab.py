"""`weitiao vocab extend`: teach a byte-level BPE tokenizer a domain's words, and give the model rows for them.

An English-centric tokenizer spells a Chinese character with two or three byte tokens, so Chinese text costs
several times the tokens (context, compute) of the same text for a model that knows the script. Extension:

1. Train a SentencePiece BPE model on the domain corpus: identity normalisation (the pieces are the corpus's own
   characters), no dummy prefix, digits split one by one (as the base tokenizers already split them).
2. Candidates are its pieces that the base tokenizer spells with two or more tokens, that fit in one pre-token
   (BPE never merges across pre-tokens, such as a word and the punctuation after it) and that occur at least
   min_frequency times in the corpus's SentencePiece segmentation. The ones that save most tokens (frequency x
   (base tokens - 1)) come first, until `count` new tokens are used.
3. Each piece becomes a BPE token of the base tokenizer: a vocabulary entry plus merges, ranked after every base
   merge. Byte-level BPE applies merges by rank, so a text is first tokenized exactly as before, and the new merges
   then join adjacent tokens into new pieces. Text in which no new merge applies keeps its exact old tokens, no
   text ever gets more tokens than before, and decoding stays byte-exact. A piece's missing parts (a character the
   base spells with three byte tokens needs one of its two-token prefixes) are added first and count as tokens.
   Added tokens (`tokenizer.add_tokens`) would be the simpler route, but they are matched as raw strings before
   byte-level BPE: they split words anywhere ("law" inside "lawyer") and, with the Fuse decoder of GGUF-converted
   tokenizers, decode to mojibake next to byte tokens.
4. The model's embeddings (and untied output head) grow by the new tokens; each new row is the mean of the rows of
   the base tokens that spelled the piece, so the model starts from what it already read for that text.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weitiao.config import DataSource, ModelConfig
from weitiao.data.dataset import SourceStats, iter_source
from weitiao.data.readers import expand_paths
from weitiao.errors import WeitiaoError

REPORT_FILE = "vocab_extension.json"


@dataclass
class Piece:
    text: str
    symbol: str
    """The piece in the BPE model's alphabet (byte-level characters)."""
    frequency: int
    base_tokens: int
    rank: int
    """Position in the SentencePiece model, whose order is its merge order: earlier merges win over later ones."""

    @property
    def saving(self) -> int:
        return self.frequency * (self.base_tokens - 1)


@dataclass
class Extension:
    """New BPE tokens (byte-level symbols, in id order) and the merges that form them, in rank order."""
    tokens: list[str] = field(default_factory=list)
    merges: list[tuple[str, str]] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    """The texts of the candidate pieces added (the other new tokens are their missing parts)."""


def text_documents(paths: Iterable[str], sample_by: str = "paragraph") -> Iterator[str]:
    """The text of every record of the corpus files: plain text, or the turns of a conversation one per line."""
    for path in paths:
        for example in iter_source(DataSource(path=path, sample_by=sample_by), "skip", SourceStats(path=path)):
            if example.text is not None:
                yield example.text
            else:
                yield "\n".join(message["content"] for message in example.messages)


def split_held_out(documents: Iterable[str], fraction: float) -> tuple[list[str], list[str]]:
    """Every round(1/fraction)-th document is held out: deterministic, and spread over the whole corpus."""
    every = max(2, round(1 / fraction)) if fraction > 0 else 0
    train, held_out = [], []
    for index, document in enumerate(documents):
        (held_out if every and index % every == every - 1 else train).append(document)
    return train, held_out


def _lines(documents: Iterable[str]) -> Iterator[str]:
    for document in documents:
        for line in document.splitlines():
            if line.strip():
                yield line


def train_sentencepiece(documents: list[str], vocab_size: int, character_coverage: float = 0.9995,
                        threads: int = 2):
    """A SentencePiece BPE model of the corpus (its lines are SentencePiece's sentences), in memory."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(documents), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            character_coverage=character_coverage, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False, byte_fallback=False,
            max_sentence_length=1 << 16, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            bos_id=-1, eos_id=-1, unk_id=0, num_threads=threads, minloglevel=2)
    except RuntimeError as error:
        raise WeitiaoError(f"SentencePiece could not train on the corpus: {error}") from None
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _byte_level(text: str) -> str:
    from tokenizers.pre_tokenizers import ByteLevel

    return ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]


def check_byte_level_bpe(tokenizer) -> dict[str, Any]:
    """The tokenizer.json of a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, SmolLM...), or a one-line error."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    if state.get("model", {}).get("type") != "BPE" or '"ByteLevel"' not in json.dumps(state.get("pre_tokenizer")):
        raise WeitiaoError("vocab extend works on byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM and "
                           "similar); this model's tokenizer is not one")
    return state


def candidate_pieces(processor, documents: list[str], tokenizer, min_frequency: int) -> list[Piece]:
    """SentencePiece pieces worth adding, most tokens saved first (see the module docstring)."""
    backend = tokenizer.backend_tokenizer
    frequency: Counter[str] = Counter()
    lines = list(_lines(documents))
    for start in range(0, len(lines), 10_000):
        for pieces in processor.encode(lines[start:start + 10_000], out_type=str):
            frequency.update(pieces)
    candidates = []
    for rank in range(processor.get_piece_size()):
        if processor.is_unknown(rank) or processor.is_control(rank):
            continue
        piece = processor.id_to_piece(rank)
        text = piece.replace("\u2581", " ")  # SentencePiece's mark of a space
        if frequency[piece] < min_frequency or not text.strip():
            continue
        if backend.normalizer is not None and backend.normalizer.normalize_str(text) != text:
            continue  # the tokenizer would never see this text as it is
        if len(backend.pre_tokenizer.pre_tokenize_str(text)) != 1:
            continue
        symbol = _byte_level(text)
        base_tokens = len(backend.model.tokenize(symbol))
        if base_tokens >= 2:
            candidates.append(Piece(text, symbol, frequency[piece], base_tokens, rank))
    return sorted(candidates, key=lambda piece: (-piece.saving, piece.rank))


def plan_extension(tokenizer, candidates: list[Piece], count: int, sentencepiece_ranks: dict[str, int]
                   ) -> Extension:
    """Choose up to `count` new tokens: candidates in order, each with the parts it is built from."""
    backend = tokenizer.backend_tokenizer
    base_vocab = backend.get_vocab()
    chosen: dict[str, int] = {}  # symbol -> rank of its merges: -1 for parts of characters, else SentencePiece's
    extension = Extension()

    def build(text: str | None, symbol: str, planned: dict[str, int]) -> None:
        """Plan `symbol` (the byte-level form of `text`; None for part of a character) after its missing parts."""
        if symbol in base_vocab or symbol in chosen or symbol in planned:
            return
        halves = _sentencepiece_halves(text, sentencepiece_ranks) if text and len(text) > 1 else None
        if halves is not None:
            for half in halves:
                build(half, _byte_level(half), planned)
        else:
            # A character, or a piece SentencePiece did not build from two pieces: grow it from its base tokens
            # left to right, so that each prefix is one merge away from the next.
            parts = [token.value for token in backend.model.tokenize(symbol)]
            prefix = parts[0]
            for part in parts[1:-1]:
                prefix += part
                build(None, prefix, planned)
        planned[symbol] = sentencepiece_ranks.get(text, -1) if text else -1

    for piece in candidates:
        planned: dict[str, int] = {}
        build(piece.text, piece.symbol, planned)
        if len(chosen) + len(planned) > count:
            continue
        chosen.update(planned)
        extension.pieces.append(piece.text)
        if len(chosen) == count:
            break
    # Merges: every split of a new token into two known tokens, so it forms whichever way its neighbours merged.
    # Parts of characters rank first (they never compete with other merges), then pieces in SentencePiece order.
    known = set(base_vocab) | set(chosen)
    for symbol in sorted(chosen, key=lambda s: (chosen[s], len(s))):
        extension.tokens.append(symbol)
        extension.merges += [(symbol[:cut], symbol[cut:]) for cut in range(1, len(symbol))
                             if symbol[:cut] in known and symbol[cut:] in known]
    return extension


def _sentencepiece_halves(text: str, sentencepiece_ranks: dict[str, int]) -> tuple[str, str] | None:
    """A split of `text` into two SentencePiece pieces (how SentencePiece BPE built it), the most even one."""
    cuts = [cut for cut in range(1, len(text))
            if text[:cut] in sentencepiece_ranks and text[cut:] in sentencepiece_ranks]
    if not cuts:
        return None
    cut = min(cuts, key=lambda c: abs(len(text) - 2 * c))
    return text[:cut], text[cut:]


def extended_tokenizer(tokenizer, extension: Extension, folder: Path, first_id: int):
    """Save `tokenizer` with the new tokens (ids from `first_id`) and merges to `folder`; load it back."""
    from transformers import AutoTokenizer

    state = check_byte_level_bpe(tokenizer)
    for offset, symbol in enumerate(extension.tokens):
        state["model"]["vocab"][symbol] = first_id + offset
    merges = state["model"]["merges"]
    as_strings = bool(merges) and isinstance(merges[0], str)  # older tokenizer.json files write "a b"
    merges += [" ".join(pair) if as_strings else list(pair) for pair in extension.merges]
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    return AutoTokenizer.from_pretrained(folder)


def resize_embeddings(model: torch.nn.Module, spellings: list[list[int]]) -> None:
    """Append one embedding row per new token (and one output row when the head is not tied): the mean of the
    rows of the base tokens that spell it."""
    old_size = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(old_size + len(spellings), mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    with torch.no_grad():
        for matrix in matrices:
            for offset, ids in enumerate(spellings):
                matrix[old_size + offset] = matrix[ids].mean(dim=0)


def tokens_per_char(tokenizer, texts: list[str]) -> float:
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens / max(1, sum(len(text) for text in texts))


def compare_tokenizations(base, extended, texts: list[str]) -> dict[str, int]:
    """Line by line: decode(encode(line)) == line with the extended tokenizer, and lines in which no new token
    appears tokenized exactly as by the base tokenizer."""
    lines = list(_lines(texts))
    old = base(lines, add_special_tokens=False)["input_ids"]
    new = extended(lines, add_special_tokens=False)["input_ids"]
    base_size = len(base)
    untouched = [i for i, ids in enumerate(new) if all(token < base_size for token in ids)]
    return {"lines": len(lines),
            "round_trips": sum(extended.decode(ids) == line for ids, line in zip(new, lines, strict=True)),
            "lines_without_new_tokens": len(untouched),
            "unchanged_without_new_tokens": sum(new[i] == old[i] for i in untouched)}


def extend_vocabulary(model_name: str, corpus: list[str], out: str | Path, count: int, min_frequency: int = 5,
                      held_out: float = 0.05, eval_corpus: list[str] | None = None, sentencepiece_vocab: int = 16000,
                      sample_by: str = "paragraph", character_coverage: float = 0.9995,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Extend the tokenizer of `model_name` with up to `count` pieces of `corpus` and save model + tokenizer to
    `out`; return the report (also written to out/vocab_extension.json). Tokens per character are measured on
    `eval_corpus`, or else on the `held_out` share of the corpus's documents, which are then not learned from."""
    from transformers import AutoModelForCausalLM

    from weitiao.models import load_tokenizer, resolve_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeitiaoError(f"--out {out} already exists and is not empty; choose a new folder")
    for path in corpus + (eval_corpus or []):
        expand_paths(path)  # a wrong path fails now, not after loading the model
    source = resolve_model(model_name)
    tokenizer = load_tokenizer(source, ModelConfig(name_or_path=model_name))
    check_byte_level_bpe(tokenizer)
    train_texts, held_out_texts = _documents(corpus, eval_corpus, held_out, sample_by)
    log(f"corpus: {len(train_texts)} documents ({sum(map(len, train_texts)):,} characters) to learn from, "
        f"{len(held_out_texts)} held out")
    processor = train_sentencepiece(train_texts, sentencepiece_vocab, character_coverage)
    extension = _extension(processor, train_texts, tokenizer, count, min_frequency, log)

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    # New ids follow the embedding rows, which some models pad beyond the tokenizer's last id.
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise WeitiaoError(f"the tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows")
    out.mkdir(parents=True, exist_ok=True)
    extended = extended_tokenizer(tokenizer, extension, out, first_id=rows)
    base_model = tokenizer.backend_tokenizer.model
    resize_embeddings(model, [[token.id for token in base_model.tokenize(symbol)] for symbol in extension.tokens])
    model.save_pretrained(out, safe_serialization=True)

    evaluation = held_out_texts or train_texts[: max(1, len(train_texts) // 20)]
    report = {
        "base_model": model_name, "corpus": corpus, "base_vocab_size": len(tokenizer),
        "vocab_size": len(extended), "tokens_added": len(extension.tokens), "pieces_added": len(extension.pieces),
        "min_frequency": min_frequency, "sentencepiece_pieces": processor.get_piece_size(),
        "held_out_documents": len(held_out_texts), "held_out_characters": sum(map(len, evaluation)),
        "tokens_per_char_before": tokens_per_char(tokenizer, evaluation),
        "tokens_per_char_after": tokens_per_char(extended, evaluation),
        "check": compare_tokenizations(tokenizer, extended, evaluation),
        "pieces": extension.pieces[:50],
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    _log_and_check(report, out, "held-out" if held_out_texts else "training", log)
    return report


def _documents(corpus: list[str], eval_corpus: list[str] | None, held_out: float,
               sample_by: str) -> tuple[list[str], list[str]]:
    """(documents to learn from, documents to measure on): eval_corpus's, or else a held-out share of corpus's."""
    if eval_corpus:
        train_texts, held_out_texts = list(text_documents(corpus, sample_by)), list(text_documents(eval_corpus,
                                                                                                   sample_by))
    else:
        train_texts, held_out_texts = split_held_out(text_documents(corpus, sample_by), held_out)
    if not train_texts:
        raise WeitiaoError("the corpus has no text to learn pieces from")
    return train_texts, held_out_texts


def _extension(processor, train_texts: list[str], tokenizer, count: int, min_frequency: int,
               log: Callable[[str], None]) -> Extension:
    """The pieces to add: SentencePiece's, spelled with 2+ tokens by the base and frequent enough, best first."""
    candidates = candidate_pieces(processor, train_texts, tokenizer, min_frequency)
    sentencepiece_ranks = {processor.id_to_piece(rank).replace("\u2581", " "): rank
                           for rank in range(processor.get_piece_size())}
    extension = plan_extension(tokenizer, candidates, count, sentencepiece_ranks)
    if not extension.tokens:
        raise WeitiaoError(f"no piece of the corpus is worth adding: every SentencePiece piece seen {min_frequency}+ "
                           "times is already one token of this tokenizer (lower --min-frequency?)")
    log(f"SentencePiece BPE: {processor.get_piece_size()} pieces, {len(candidates)} of them spelled with 2+ tokens "
        f"by the base and seen {min_frequency}+ times; added {len(extension.pieces)} pieces as "
        f"{len(extension.tokens)} tokens ({len(extension.tokens) - len(extension.pieces)} of them parts of pieces)")
    return extension


def _log_and_check(report: dict[str, Any], out: Path, measured_on: str, log: Callable[[str], None]) -> None:
    """Say what the extension did to tokens per character, and refuse a tokenizer that changes old text."""
    before, after, check = report["tokens_per_char_before"], report["tokens_per_char_after"], report["check"]
    log(f"{measured_on} text ({report['held_out_characters']:,} characters): "
        f"tokens/char {before:.3f} -> {after:.3f} ({100 * (after - before) / before:+.1f}%)")
    log(f"check: decode(encode(line)) == line for {check['round_trips']}/{check['lines']} lines; "
        f"{check['unchanged_without_new_tokens']}/{check['lines_without_new_tokens']} lines without a new token "
        "tokenize exactly as before")
    if check["round_trips"] != check["lines"] or (
            check["unchanged_without_new_tokens"] != check["lines_without_new_tokens"]):
        raise WeitiaoError(f"the extended tokenizer in {out} fails its checks (see above); please report this")
