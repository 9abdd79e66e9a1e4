"""`weitiao data clean`: remove broken, empty, cut-off, off-language and duplicate records, and account for each.

The rules run in this order, and the first that applies names the reason a record is removed:

  invalid, empty_response   the record cannot be read as a conversation (the reader's own checks)
  empty_response            a reply that is empty once zero-width characters and outer whitespace are removed
  short_response, short_prompt, too_long   length limits in characters
  refusal                   a last reply that refuses instead of answering
  filler                    a last reply that is only an acknowledgement or a placeholder ("OK", "好的。", "略")
  language                  replies not in the wanted language (share of CJK characters / Latin-script words), or
                            with `auto` not in the language of their prompt
  truncated                 a last reply that looks cut off
  boilerplate               a last reply with a line that the last replies of many records share (a footer)
  exact_duplicate           same normalised text as an earlier kept record
  near_duplicate            MinHash-estimated Jaccard similarity of character n-grams >= threshold with an
                            earlier kept record (datasketch's LSH finds the candidates)
  mismatched                (with a model) the prompt does not make the reply more likely: IFD >= 1, or IFD far above
                            that of the records with the nearest prompts
  truncated                 (with a model) a reply that ends in a letter or a digit where the model expects neither
                            its end nor a new line, or without the final line that the replies to the nearest
                            prompts share ("#### 42")

Kept records are written as they are in the input (every column, the file's own field names); every removed one
goes to OUT.removed.jsonl with its rule, a detail (e.g. which record it duplicates) and the original record.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weitiao.config import CleanConfig, DataSource, SelectConfig
from weitiao.data.dataset import Example, load_source, original_records
from weitiao.data.encode import prompt_messages
from weitiao.data.readers import Record, side_file, to_json, write_records
from weitiao.data.select import ifd_scores, nearest_neighbours
from weitiao.data.tools import message_text
from weitiao.errors import ConfigError, DataError

RULES = ("invalid", "empty_response", "short_response", "short_prompt", "too_long", "refusal", "filler", "language",
         "truncated", "boilerplate", "exact_duplicate", "near_duplicate", "mismatched")
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# A CJK character is one unit; a run of other letters is one word (digits and underscores are not letters).
_UNITS = re.compile(rf"[{_CJK}]|[^\W\d_{_CJK}]+")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")
_CODE_BLOCK = re.compile(r"```.*?(```|$)", re.DOTALL)
# Characters a finished text does not end with: a separator or an opening bracket / quote.
_UNFINISHED_ENDINGS = set(",;:、，；：([{（【《「『“‘")
# A refusal: an apology or an AI self-reference, and a refusal, near the start of a short reply.
_REFUSAL_CUE = re.compile(r"\b(?:sorry|apologi[sz]e|as an ai\b|language model)"
                          r"|抱歉|对不起|作为(?:一个|一名|一款)?(?:ai|人工智能)|语言模型", re.IGNORECASE)
_REFUSAL = re.compile(r"\b(?:can't|cannot|can not|unable to|not able to|won't be able)\b"
                      r"|无法|不能|不可以|没有办法|做不到", re.IGNORECASE)
# Prompts after which a reply in another language is expected, and replies that are code rather than prose.
_NAMES_LANGUAGE = re.compile(r"翻译|译成|译为|英文|英语|中文|汉语|translat|english|chinese", re.IGNORECASE)
_CODE_LIKE = re.compile(r"[{};]|\bdef |\bimport |\bvar\b|\breturn\b|</?[a-z]+>")
# Replies that may be code, a query or a formula, whose Latin letters say nothing about the language of the reply.
_FORMULA_LIKE = re.compile(r"[=<>/\\]")
# English text a Chinese prompt quotes or ends with (after a colon): the task's input, which the reply may be about
# ("用“shimmer”造句", "改变以下名词为复数形式：watch").
_QUOTED_LATIN = re.compile(r"[“\"‘'「『]\s*[A-Za-z][^“”\"‘’'「」『』\n]*[”\"’'」』]|[：:]\s*[A-Za-z][^\u3000-\u9fff]*$")
_SENTENCE_END = set(".!?。！？…\"'”’)）]】}>*`|~-_=#»」』")
# A last line that is a list marker with nothing after it, and a reply that stops inside a calculation: after an
# operator, or with a bracket of its last line left open.
_EMPTY_LIST_ITEM = re.compile(r"(?:^|\n)[ \t]*(?:\d+[.、)]|[-*•])[ \t]*$")
_OPEN_OPERATOR = re.compile(r"(?:=|<<[^<>\n]*>>|(?<=[\d\s)])[+*/×÷<-])$")
_BRACKETS = (("<<", ">>"), ("(（", ")）"), ("[", "]"), ("《", "》"), ("“", "”"))  # full- and half-width agree
# Replies that answer nothing: acknowledgements (unless the prompt asks a yes/no question or names the word) and
# placeholders. "None", "N/A" and "无" are left alone: they answer extraction tasks whose input has nothing to find.
_ACKNOWLEDGEMENT = re.compile(r"ok(?:ay)?|sure|yes|yeah|of course|no problem|好的?|可以|是的?|行|当然(?:可以)?|没问题",
                              re.IGNORECASE)
_YES = re.compile(r"yes|yeah|of course|可以|是的?|行|当然(?:可以)?", re.IGNORECASE)  # answers; "OK", "sure" are not
_PLACEHOLDER = re.compile(r"done|got it|understood|tbd|todo|\.{3,}|…+|略|嗯+|收到|明白了?|同上|见上", re.IGNORECASE)
_YES_NO_QUESTION = re.compile(r"^\s*(?:is|are|am|was|were|do|does|did|has|have|had|will|should)\b|\bwhether\b"
                              r"|\b(?:tell(?: me)?|determine|decide|check|say) if\b|yes or no|yes/no|true or false"
                              r"|是否|是不是|对吗|对不对|有没有|判断|吗[?？]?\s*$", re.IGNORECASE)
_REQUEST = re.compile(r"请|帮|能|可以|可否|写|生成|给我")
BOILERPLATE_MIN_CHARS = 30


@dataclass
class Removed:
    rule: str
    detail: str
    source: str
    record: int
    original: dict[str, Any]


@dataclass
class CleanResult:
    records: int
    kept: list[Example]
    originals: list[dict[str, Any]]
    """The kept records exactly as their files hold them, in the order of `kept`."""
    removed: list[Removed]
    counts: Counter = field(default_factory=Counter)


def visible(text: str) -> str:
    return _ZERO_WIDTH.sub("", text).strip()


def normalise(text: str) -> str:
    """What duplicates are compared on: NFKC (full-width and half-width forms agree), no zero-width characters,
    case-folded, whitespace runs as one space."""
    return " ".join(_ZERO_WIDTH.sub("", unicodedata.normalize("NFKC", text)).casefold().split())


def language_share(text: str, language: str) -> float | None:
    """Share of `language` among the text's units (CJK characters and words), code blocks left out; None when the
    text has no letters."""
    units = _UNITS.findall(_CODE_BLOCK.sub(" ", text))
    if not units:
        return None
    if language == "zh":
        hits = sum(1 for unit in units if len(unit) == 1 and re.match(f"[{_CJK}]", unit))
    else:
        hits = sum(1 for unit in units if _LATIN_WORD.fullmatch(unit))
    return hits / len(units)


def looks_truncated(reply: str, in_sentence: bool = False) -> str | None:
    """Why the reply looks cut off, or None. With `in_sentence` also a last line of prose that stops mid-sentence."""
    text = reply.rstrip()
    if text.count("```") % 2:
        return "unclosed ``` code block"
    if text and text[-1] in _UNFINISHED_ENDINGS and not (text[-1] == ";" and _CODE_LIKE.search(text[:-1])):
        return f"ends with '{text[-1]}'"  # a statement of code may end with ';'; a sentence not
    if _EMPTY_LIST_ITEM.search(text):
        return "ends with an empty list item"
    if _OPEN_OPERATOR.search(text):
        return f"ends inside a calculation ('{text[-12:].strip()}')"
    last_line = text.splitlines()[-1] if text else ""
    for opening, closing in _BRACKETS:
        if _count(last_line, opening) > _count(last_line, closing):
            return f"a '{opening[0]}' of the last line is never closed"
    if in_sentence and text and len(last_line.strip()) >= 15 and text[-1] not in _SENTENCE_END \
            and not text[-1].isdigit():
        return "ends inside a sentence"
    return None


def _count(text: str, marks: str) -> int:
    """Occurrences of a two-character mark ("<<"), or of any of a set of one-character marks."""
    return text.count(marks) if marks in ("<<", ">>") else sum(text.count(mark) for mark in marks)


def looks_like_filler(prompt: str, reply: str) -> bool:
    """The reply is only an acknowledgement or a placeholder, not an answer to `prompt`."""
    text = visible(reply).rstrip(" .。!！~～")
    # The prompt names the word (Reply "OK" when ready; 回答“好的”): as a word of its own, not a part of one (策略).
    named = bool(text) and re.search(rf"(?<!\w){re.escape(text)}(?!\w)", prompt, re.IGNORECASE) is not None
    if _PLACEHOLDER.fullmatch(text):
        return not named
    if _ACKNOWLEDGEMENT.fullmatch(text):
        yes_no = bool(_YES_NO_QUESTION.search(prompt.strip())) and not _REQUEST.search(prompt)
        return not (yes_no and _YES.fullmatch(text)) and not named
    return False


def looks_like_refusal(reply: str) -> bool:
    text = visible(reply)
    return len(text) <= 400 and bool(_REFUSAL_CUE.search(text[:150])) and bool(_REFUSAL.search(text[:150]))


def _names_language(prompt: str) -> bool:
    """The prompt's instruction, its first or last line, names a language or a translation; a language named in
    the text it gives to work on ("a crash in southern China") asks for nothing."""
    lines = prompt.strip().splitlines() or [""]
    return bool(_NAMES_LANGUAGE.search(lines[0]) or _NAMES_LANGUAGE.search(lines[-1]))


def _language_mismatch(messages: list[dict[str, str]]) -> str | None:
    """The first reply that is not in the language of the prompt before it (language `auto`), described."""
    for before, message in zip(messages, messages[1:]):
        if message["role"] != "assistant" or before["role"] != "user" or _names_language(before["content"]):
            continue
        reply = message_text(message)
        units = _UNITS.findall(_CODE_BLOCK.sub(" ", reply))
        prompt_zh, reply_zh = language_share(before["content"], "zh"), language_share(reply, "zh")
        if prompt_zh is None or reply_zh is None:
            continue
        # A word or two of English can be the label a Chinese prompt asks for, and code is English-like whatever
        # the language of its request; Chinese characters in the reply to an English prompt are Chinese however
        # few, in code (comments, strings, prose around it) too.
        if prompt_zh >= 0.6 and len(units) >= 5 and not (_CODE_LIKE.search(reply) or _FORMULA_LIKE.search(reply)) \
                and language_share(reply, "en") >= 0.8 and not _QUOTED_LATIN.search(before["content"].strip()):
            return f"a Chinese prompt (zh share {prompt_zh:.2f}) answered in English"
        if language_share(before["content"], "en") >= 0.9 and reply_zh >= 0.5:
            return f"an English prompt answered in Chinese (zh share {reply_zh:.2f})"
    return None


def _lines(text: str) -> set[str]:
    """The normalised lines of a text long enough to be a footer or disclaimer rather than a common phrase."""
    return {line for line in map(normalise, text.splitlines()) if len(line) >= BOILERPLATE_MIN_CHARS}


def shared_lines(examples: list[Example], min_records: int) -> dict[str, int]:
    """Lines found in the last replies of at least `min_records` records, with their record counts."""
    counts = Counter(line for example in examples for line in _lines(_parts(example.messages)[1][-1]))
    return {line: count for line, count in counts.items() if count >= min_records}


def _parts(messages: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """The prompts (user turns) and replies of a conversation."""
    return ([m["content"] for m in messages if m["role"] == "user"],
            [message_text(m) for m in messages if m["role"] == "assistant"])


def _rule_violation(messages: list[dict[str, str]], config: CleanConfig,
                    boilerplate: dict[str, int]) -> tuple[str, str] | None:
    """The first per-record rule the conversation breaks, as (rule, detail); `boilerplate` holds the lines shared
    by many records' last replies."""
    prompts, replies = _parts(messages)
    shortest = min(len(visible(reply)) for reply in replies)
    if shortest == 0:
        return "empty_response", "a reply is empty (or only invisible characters)"
    if shortest < config.min_response_chars:
        return "short_response", f"a reply of {shortest} characters (minimum {config.min_response_chars})"
    if prompts and len(visible(prompts[-1])) < config.min_prompt_chars:
        return "short_prompt", f"prompt of {len(visible(prompts[-1]))} characters (minimum {config.min_prompt_chars})"
    total = sum(len(m["content"]) for m in messages)
    if config.max_chars is not None and total > config.max_chars:
        return "too_long", f"{total} characters (maximum {config.max_chars})"
    if config.refusal and looks_like_refusal(replies[-1]):
        return "refusal", visible(replies[-1])[:80]
    if config.filler and looks_like_filler(prompts[-1] if prompts else "", replies[-1]):
        return "filler", f"the reply is only '{visible(replies[-1])}'"
    if config.language == "auto" and (why := _language_mismatch(messages)):
        return "language", why
    if config.language not in ("any", "auto"):
        share = language_share("\n".join(replies), config.language)
        if share is not None and share < config.language_share:
            return "language", f"{config.language} share {share:.2f} (minimum {config.language_share})"
    if config.truncated and (why := looks_truncated(replies[-1], config.truncated_sentence)):
        return "truncated", why
    for line in _lines(replies[-1]):
        if line in boilerplate:
            return "boilerplate", f"'{line[:60]}' is in the last replies of {boilerplate[line]} records"
    return None


def dedup_text(messages: list[dict[str, str]], on: str) -> str:
    last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    chosen = {"conversation": messages, "prompt": messages[:last_reply],
              "response": messages[last_reply:last_reply + 1]}[on]
    return "\n".join(f"{m['role']}: {normalise(message_text(m))}" for m in chosen)


class NearDuplicateIndex:
    """Kept texts in a MinHash LSH index; `find` returns the most similar kept text at or above the threshold.
    LSH only proposes candidates, so each is checked against the threshold with its MinHash estimate."""

    def __init__(self, threshold: float, num_perm: int, shingle_size: int):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm, self.shingle_size = threshold, num_perm, shingle_size
        try:
            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        except ValueError:  # LSH needs at least 2 bands of rows; a threshold near 1 leaves one
            raise ConfigError(f"near_dup_threshold {threshold} is too close to 1 for num_perm {num_perm}; lower it "
                              "or raise num_perm (identical records are exact_dedup's job)") from None
        self.signatures: dict[int, Any] = {}

    def signature(self, text: str):
        from datasketch import MinHash

        size = self.shingle_size
        shingles = {text[i:i + size] for i in range(max(1, len(text) - size + 1))}
        minhash = MinHash(num_perm=self.num_perm, seed=1)
        minhash.update_batch([s.encode("utf-8") for s in shingles])
        return minhash

    def find(self, signature) -> tuple[int, float] | None:
        scored = [(signature.jaccard(self.signatures[key]), key) for key in self.lsh.query(signature)]
        scored = [(similarity, key) for similarity, key in scored if similarity >= self.threshold]
        if not scored:
            return None
        similarity, key = max(scored, key=lambda item: (item[0], -item[1]))
        return key, similarity

    def add(self, key: int, signature) -> None:
        self.lsh.insert(key, signature)
        self.signatures[key] = signature


def _prompt_and_reply(messages: list[dict[str, str]]) -> tuple[str, str]:
    """Everything before the last reply, and the last reply, normalised."""
    last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return (dedup_text(messages, "prompt"), normalise(message_text(messages[last_reply])))


def _edited_reply(reply: str, earlier: list[tuple[int, str]] | None, threshold: float) -> tuple[int, float] | None:
    """The earlier (index, reply) of the same prompt most like `reply` by difflib's ratio of matching characters,
    with that ratio, if it reaches `threshold`."""
    best = None
    for index, other in earlier or ():
        matcher = difflib.SequenceMatcher(None, reply, other, autojunk=False)
        if matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold \
                and (ratio := matcher.ratio()) >= threshold and (best is None or ratio > best[1]):
            best = index, ratio
    return best


def find_faults(examples: list[Example], config: CleanConfig) -> dict[int, tuple[str, str]]:
    """The examples (by index) that break a rule, each with (rule, detail); the first that applies names it.
    Duplicates are judged against the earlier examples that break no rule (the first occurrence is kept)."""
    faults: dict[int, tuple[str, str]] = {}
    kept: list[int] = []
    seen_exact: dict[str, Example] = {}
    near = (NearDuplicateIndex(config.near_dup_threshold, config.num_perm, config.shingle_size)
            if config.near_dedup else None)
    boilerplate = shared_lines(examples, config.boilerplate_records) if config.boilerplate_records else {}
    # Kept replies by their normalised prompt: a short reply edited by a word or two is a near duplicate that
    # n-gram sets miss (one edit changes most of its few n-grams).
    same_prompt: dict[str, list[tuple[int, str]]] | None = (
        {} if near is not None and config.dedup_on == "conversation" else None)
    for index, example in enumerate(examples):
        verdict = _rule_violation(example.messages, config, boilerplate)
        text = dedup_text(example.messages, config.dedup_on)
        if verdict is None and config.exact_dedup and text in seen_exact:
            first = seen_exact[text]
            verdict = "exact_duplicate", f"same as record {first.record} of {first.source}"
        signature = near.signature(text) if near is not None and verdict is None else None
        if signature is not None and (match := near.find(signature)):
            first, similarity = examples[kept[match[0]]], match[1]
            verdict = "near_duplicate", (f"similarity {similarity:.2f} with record {first.record} of "
                                         f"{first.source}")
        prompt_key, reply = _prompt_and_reply(example.messages) if same_prompt is not None else ("", "")
        if same_prompt is not None and verdict is None \
                and (match := _edited_reply(reply, same_prompt.get(prompt_key), config.near_dup_threshold)):
            first, similarity = examples[match[0]], match[1]
            verdict = "near_duplicate", (f"the same prompt as record {first.record} of {first.source}, and a reply "
                                         f"{similarity:.2f} alike character by character")
        if verdict is not None:
            faults[index] = verdict
            continue
        seen_exact.setdefault(text, example)
        if signature is not None:
            near.add(len(kept), signature)
        if same_prompt is not None:
            same_prompt.setdefault(prompt_key, []).append((index, reply))
        kept.append(index)
    if config.model and kept:
        faults.update(_model_faults([examples[i] for i in kept], kept, config))
    return faults


def ends_in_a_word(reply: str) -> bool:
    """The reply's last visible character is a letter (a CJK character counts) or a digit: no closing punctuation,
    bracket or symbol, where a finished text usually has one. A number can be cut ("= <<17+8=25>>2") as a word can."""
    text = visible(reply)
    return bool(text) and unicodedata.category(text[-1])[0] in "LN"


def last_line_opening(reply: str) -> str:
    """The first word of the reply's last line ('####' in GSM8K's '#### 42'); '' for an empty reply."""
    lines = visible(reply).splitlines()
    words = lines[-1].split() if lines else []
    return words[0] if words else ""


def _compare_with_neighbours(scores: dict[str, np.ndarray], replies: list[str], count: int, ending_share: float
                             ) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[str, int]]]:
    """Per record, against the `count` records with the nearest prompts: their median IFD, how many median absolute
    deviations (at least 0.02) its IFD lies above it, and (by position) the first word of the last line that at
    least `ending_share` of their replies share and its own last line lacks, with how many share it."""
    neighbours = nearest_neighbours(scores["embedding"], count)
    ifd = scores["ifd"]
    with warnings.catch_warnings():  # a neighbourhood without any IFD has none to compare with: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(ifd[neighbours], axis=1)
        spread = np.nanmedian(np.abs(ifd[neighbours] - median[:, None]), axis=1)
    openings = [last_line_opening(reply) for reply in replies]
    missing_ending = {}
    for position, row in enumerate(neighbours):
        common, sharing = Counter(openings[j] for j in row).most_common(1)[0]
        if common and sharing >= ending_share * count and openings[position] != common:
            missing_ending[position] = common, sharing
    return median, (ifd - median) / np.maximum(spread, 0.02), missing_ending


def _model_faults(examples: list[Example], indices: list[int], config: CleanConfig) -> dict[int, tuple[str, str]]:
    """Those of `examples` (at `indices`) that config.model scores as truncated or mismatched. A reply of 20
    characters or more that ends in a letter or a digit is truncated where the probability of ending or starting a
    new line is below end_probability, or where ending_share of its neighbours' replies end with a last line that
    opens with a word its own last line lacks; a record is mismatched at IFD >= mismatch_ifd, or at
    mismatch_outlier median absolute deviations above its neighbours' median IFD. An example with no reply token
    within max_length has no scores and passes; one whose end max_length cut off is not checked for truncation."""
    near = config.neighbours if config.neighbours and len(examples) > config.neighbours else 0
    scores, _ = ifd_scores(examples, SelectConfig(method="ifd", count=len(examples), model=config.model,
                                                  template=config.template, max_length=config.max_length),
                           embed=bool(near))
    replies = [prompt_messages(example.messages)[1] for example in examples]
    ifd, end_loss = scores["ifd"], scores["end_loss"]
    median = outlier = np.full(len(examples), np.nan)
    missing_ending: dict[int, tuple[str, int]] = {}
    if near:
        median, outlier, missing_ending = _compare_with_neighbours(scores, replies, near, config.ending_share)
    end_limit = -math.log(config.end_probability) if config.end_probability else math.inf
    faults = {}
    for position, (index, reply) in enumerate(zip(indices, replies, strict=True)):
        word_end = len(visible(reply)) >= 20 and ends_in_a_word(reply)
        if word_end and end_loss[position] > end_limit:  # NaN compares False
            probability = math.exp(-end_loss[position])
            faults[index] = ("truncated", f"the model gives ending here a probability of {probability:.1e}: cut off "
                                          f"mid-sentence ('...{visible(reply)[-12:]}')")
        elif word_end and position in missing_ending:
            common, count = missing_ending[position]
            faults[index] = ("truncated", f"{count} of the {near} records with the nearest prompts end their reply "
                                          f"with a line starting '{common}'; this one stops before it "
                                          f"('...{visible(reply)[-12:]}')")
        elif ifd[position] >= config.mismatch_ifd:
            faults[index] = ("mismatched", f"IFD {ifd[position]:.3f}: the prompt does not make the reply more likely")
        elif outlier[position] >= config.mismatch_outlier:
            faults[index] = ("mismatched", f"IFD {ifd[position]:.3f}, {outlier[position]:.1f} median absolute "
                                           f"deviations above the {median[position]:.3f} of the {near} records "
                                           f"with the nearest prompts: the prompt helps little with this reply")
    return faults


def clean_examples(source: DataSource, config: CleanConfig) -> CleanResult:
    """Apply the rules to every record of `source`; keep or remove each, counting removals per rule."""
    rejected: list[tuple[Record, DataError]] = []
    examples, stats = load_source(source, on_error="skip", skipped=rejected)
    if examples and examples[0].messages is None:
        raise DataError("clean works on conversations, and this source is plain text", path=source.path)
    # The reader's own "empty response" check is this command's empty_response rule; its other checks are invalid.
    removed = [Removed("empty_response" if error.reason == "empty response" else "invalid", str(error),
                       record.path, record.number, record.data) for record, error in rejected]
    originals = original_records(examples, source)
    faults = find_faults(examples, config)
    removed += [Removed(*faults[i], example.source, example.record, originals[i])
                for i, example in enumerate(examples) if i in faults]
    kept = [i for i in range(len(examples)) if i not in faults]
    return CleanResult(stats.records, [examples[i] for i in kept], [originals[i] for i in kept], removed,
                       Counter(r.rule for r in removed))


def write_clean(result: CleanResult, output: Path, source: str) -> dict[str, Any]:
    """OUT (kept records as in the input), OUT.removed.jsonl and OUT.summary.json; returns the summary."""
    if not result.kept:
        counts = ", ".join(f"{count} {rule}" for rule, count in result.counts.most_common())
        raise DataError(f"every record was removed ({counts}); nothing to write", path=source)
    write_records(result.originals, output)
    removed_path = side_file(output, "removed.jsonl")
    with removed_path.open("w", encoding="utf-8") as handle:
        for item in sorted(result.removed, key=lambda item: (item.source, item.record)):
            handle.write(to_json({"rule": item.rule, "detail": item.detail, "source": item.source,
                                  "record": item.record, "original": item.original}, report=True) + "\n")
    summary = {"input": source, "output": str(output), "records": result.records, "kept": len(result.kept),
               "removed": len(result.removed), "removed_by_rule": {rule: result.counts[rule] for rule in RULES
                                                                   if result.counts[rule]},
               "files": {"removed": str(removed_path)}}
    side_file(output, "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    return summary


def format_clean_summary(summary: dict[str, Any]) -> str:
    lines = [f"read {summary['records']} records, kept {summary['kept']} -> {summary['output']}"]
    if summary["removed"]:
        lines.append(f"removed {summary['removed']} -> {summary['files']['removed']}")
        lines += [f"  {count:>6}  {rule}" for rule, count in summary["removed_by_rule"].items()]
    return "\n".join(lines)
