"""A realistic noisy instruction pool, built reproducibly from ../shared/data, with every injected fault labelled.

  python bench/noisy_pool_data.py --out outputs/noisy-pool/data [--scale 0.25] [--heldout 100]

Writes, under --out:
  pool.jsonl          the pool, sharegpt-style {"id", "task", "conversations": [{from, value}...]}, shuffled
  pool.labels.jsonl   one line per pool record: {"id", "task", "source", "fault", "detail"}; fault is null for
                      the clean records and one of FAULTS for the injected ones
  heldout/<task>.jsonl  held-out examples per task type, none of which overlaps the pool (checked: see overlap)
  build.json          counts per task and fault, and the n-gram overlap check

Task types (clean records before faults, at --scale 1):
  math_en      GSM8K train, 1,500 (held out: GSM8K test)
  instruct_zh  alpaca_zh 900 + BELLE zh seed tasks 175 (held out: 100 other alpaca_zh records)
  chat_zh      ShareGPT-zh multi-turn, 880 (held out: 100 other conversations)
  instruct_en  Self-Instruct seed tasks 175 + the chosen replies of dpo_en_demo 250 (held out: 50 other dpo_en ones)
Faults, as a share of the clean records (each a record added or a clean record replaced, as real dumps have them):
  exact_duplicate 5%  a copy of a pool record, sometimes with full-width punctuation or extra whitespace
  near_duplicate 4%   a copy with small edits (a word added, punctuation changed, two characters swapped)
  truncated 4%        the last reply cut off at 30-80% of its length (a generation that hit its token limit)
  shuffled 4%         the last reply of another record of the same task (misaligned rows)
  wrong_language 3%   a BELLE zh instruction answered with the Self-Instruct English output of the same seed task,
                      or the other way round (correct content, wrong language); where both outputs have Chinese
                      characters (a translation task) or neither has (code, a number, "D") the reply is put in
                      all the same, labelled as no fault (16 of 116 at --scale 1)
  empty_or_one_word 3%  the reply empty, invisible (U+200B) or one word ("OK", "好的。") where the original was long
  refusal 3%          a refusal ("I'm sorry, but I can't...", "作为一个AI语言模型，我无法...") instead of the answer
  boilerplate 2%      the answer followed by a long repeated disclaimer / site footer
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import shared_data_dir  # noqa: E402
from weitiao.data.clean import normalise  # noqa: E402

FAULTS = {"exact_duplicate": 0.05, "near_duplicate": 0.04, "truncated": 0.04, "shuffled": 0.04,
          "wrong_language": 0.03, "empty_or_one_word": 0.03, "refusal": 0.03, "boilerplate": 0.02}
REFUSALS = {
    "en": ["I'm sorry, but I can't help with that request.",
           "As an AI language model, I am unable to provide an answer to this question.",
           "I apologize, but I cannot assist with this. Is there anything else I can help you with?",
           "Sorry, I am not able to do that. As an AI, I don't have the ability to complete this task."],
    "zh": ["抱歉，我无法回答这个问题。",
           "作为一个AI语言模型，我无法提供这方面的帮助。如果您有其他问题，请随时告诉我。",
           "对不起，这个问题超出了我的能力范围，我不能回答。",
           "很抱歉，作为人工智能助手，我不能完成这个任务。"],
}
ONE_WORD = {"en": ["OK", "Sure.", "Yes", "Done.", "N/A"], "zh": ["好的。", "是的", "嗯", "可以。", "略"]}
EMPTY = ["", "   ", "\u200b"]
BOILERPLATE = {
    "en": ["Disclaimer: The information provided above is for general informational purposes only and does not "
           "constitute professional advice. Always consult a qualified professional.",
           "Thank you for reading! If you found this answer helpful, please like, share and subscribe to our "
           "newsletter for more content like this. Visit our website for more articles."],
    "zh": ["免责声明：以上内容仅供参考，不构成任何专业建议，如有需要请咨询相关专业人士。"
           "本回答由AI自动生成，请注意甄别。",
           "感谢您的阅读！如果您觉得这个回答有帮助，欢迎点赞、收藏和转发，关注我们的公众号获取更多精彩内容。"],
}
NEAR_EDITS_EN = ["Well, ", "Sure! ", "OK, so ", "Note: "]
NEAR_EDITS_ZH = ["好的，", "嗯，", "注意：", "那么，"]
_CJK = re.compile("[\u4e00-\u9fff]")


def language(text: str) -> str:
    return "zh" if len(_CJK.findall(text)) > 0.2 * max(1, len(text.split())) else "en"


def conversation(prompt: str, reply: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def seed_task(task: dict) -> tuple[str, str]:
    instance = task["instances"][0]
    prompt = task["instruction"] + (f"\n{instance['input']}" if instance["input"].strip() else "")
    return prompt, instance["output"]


def load_sources(data: Path, rng: random.Random, scale: float, heldout: int) -> tuple[list[dict], dict, dict]:
    """Clean pool records, held-out records per task, and the parallel seed tasks (for wrong-language faults)."""
    pool: list[dict] = []
    held: dict[str, list[dict]] = {}

    def add(task: str, source: str, conversations: list[dict[str, str]]) -> None:
        pool.append({"task": task, "source": source, "conversations": conversations})

    def sample(items: list, count: int) -> list:
        return rng.sample(items, min(len(items), count))

    gsm_train, gsm_test = read_jsonl(data / "gsm8k/train.jsonl"), read_jsonl(data / "gsm8k/test.jsonl")
    for row in sample(gsm_train, round(1500 * scale)):
        add("math_en", "gsm8k/train", conversation(row["question"], row["answer"]))
    held["math_en"] = [conversation(r["question"], r["answer"]) for r in gsm_test[:heldout]]

    alpaca = json.loads((data / "alpaca_zh/alpaca_zh_demo.json").read_text(encoding="utf-8"))
    alpaca = [conversation(r["instruction"] + (f"\n{r['input']}" if r["input"].strip() else ""), r["output"])
              for r in alpaca]
    rng.shuffle(alpaca)
    held["instruct_zh"] = alpaca[:heldout]
    for conv in alpaca[heldout:heldout + round(900 * scale)]:
        add("instruct_zh", "alpaca_zh", conv)
    belle = {t["id"]: t for t in read_jsonl(data / "belle_zh/zh_seed_tasks.json")}
    english = {t["id"]: t for t in read_jsonl(data / "self_instruct_seed/seed_tasks.jsonl")}
    for key in sample(sorted(belle), round(175 * scale)):
        add("instruct_zh", f"belle_zh/{key}", conversation(*seed_task(belle[key])))
    for key in sample(sorted(english), round(175 * scale)):
        add("instruct_en", f"self_instruct/{key}", conversation(*seed_task(english[key])))

    chats = []
    for row in read_jsonl(data / "sharegpt_zh/sharegpt_zh_1K_format.jsonl"):
        turns = row["conversations"]
        while turns and turns[-1]["from"] != "gpt":  # a conversation ending on a question has no reply to learn
            turns = turns[:-1]
        if turns and all(turn["value"].strip() for turn in turns):  # the source's own empty turns left out
            chats.append(turns)
    rng.shuffle(chats)
    held["chat_zh"] = chats[:heldout]
    for conv in chats[heldout:heldout + round(880 * scale)]:
        add("chat_zh", "sharegpt_zh", conv)

    dpo = json.loads((data / "preference/dpo_en_demo.json").read_text(encoding="utf-8"))
    dpo = [row["conversations"] + [row["chosen"]] for row in dpo]
    rng.shuffle(dpo)
    held["instruct_en"] = dpo[:max(1, heldout // 2)]
    for conv in dpo[max(1, heldout // 2):max(1, heldout // 2) + round(250 * scale)]:
        add("instruct_en", "dpo_en_demo", conv)
    parallel = {key: (belle[key], english[key]) for key in sorted(set(belle) & set(english))}
    return pool, held, parallel


def reply(record: dict) -> str:
    return record["conversations"][-1]["value"]


def with_reply(record: dict, text: str) -> dict:
    conversations = [dict(turn) for turn in record["conversations"]]
    conversations[-1]["value"] = text
    return {**record, "conversations": conversations}


def near_edit(text: str, rng: random.Random) -> str:
    """A small edit that changes the normalised text: a word in front, the last punctuation changed, or two
    neighbouring characters swapped."""
    while True:
        edited = _edit(text, rng)
        if normalise(edited) != normalise(text):
            return edited


def _edit(text: str, rng: random.Random) -> str:
    zh = language(text) == "zh"
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(NEAR_EDITS_ZH if zh else NEAR_EDITS_EN) + text
    if kind == 1 and text and not text[-1].isalnum():
        return text[:-1] + ("！" if zh else "!")
    if len(text) > 10:
        i = rng.randrange(1, len(text) - 2)
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]
    return text + ("。" if zh else ".")


def exact_copy(text: str, rng: random.Random) -> str:
    """The same text as duplicates appear in dumps: verbatim, with extra whitespace, or full-width punctuation."""
    kind = rng.randrange(3)
    if kind == 1:
        return "  " + text.replace(" ", "  ") + "\n"
    if kind == 2:
        return text.replace(",", "，").replace("?", "？").replace("!", "！")
    return text


def truncate(text: str, rng: random.Random) -> str:
    cut = rng.randint(int(len(text) * 0.3), int(len(text) * 0.8))
    while cut < len(text) - 1 and text[cut - 1] in ".!?。！？\n":  # cut inside a sentence, as a token limit does
        cut += 1
    return text[:cut]


def inject(pool: list[dict], parallel: dict, rng: random.Random) -> list[dict]:
    """The pool with the faults of FAULTS injected: new records (duplicates) and replaced ones, each labelled."""
    size = len(pool)
    records = [{**r, "fault": None, "detail": None} for r in pool]
    long_reply = [i for i, r in enumerate(records) if len(reply(r)) >= 80]
    # Each replaced record is replaced once: victims are drawn without replacement across the faults.
    victims = iter(rng.sample(long_reply, len(long_reply)))
    def replace(fault: str, count: int, make) -> None:
        for _ in range(count):
            index = next(victims)
            records[index] = {**make(records[index]), "fault": fault}

    def shuffled(record: dict) -> dict:
        donors = [r for r in pool if r["task"] == record["task"] and reply(r) != reply(record)]
        return {**with_reply(record, reply(rng.choice(donors))), "detail": "reply of another record"}

    replace("truncated", round(FAULTS["truncated"] * size),
            lambda r: {**with_reply(r, truncate(reply(r), rng)), "detail": f"cut from {len(reply(r))} chars"})
    replace("shuffled", round(FAULTS["shuffled"] * size), shuffled)
    replace("empty_or_one_word", round(FAULTS["empty_or_one_word"] * size),
            lambda r: {**with_reply(r, rng.choice(EMPTY + ONE_WORD[language(reply(r))])), "detail": None})
    replace("refusal", round(FAULTS["refusal"] * size),
            lambda r: {**with_reply(r, rng.choice(REFUSALS[language(r["conversations"][0]["value"])])),
                       "detail": None})

    def boilerplate(record: dict) -> dict:
        lang = language(reply(record))
        footer = "\n\n".join(rng.choice(BOILERPLATE[lang]) for _ in range(rng.randint(3, 6)))
        return {**with_reply(record, reply(record) + "\n\n" + footer), "detail": "footer repeated"}

    replace("boilerplate", round(FAULTS["boilerplate"] * size), boilerplate)
    # Wrong language: a seed task's prompt in one language, its answer in the other; replaces that seed's record.
    seed_records = {r["source"].split("/", 1)[1]: i for i, r in enumerate(records)
                    if r["source"].startswith(("belle_zh/", "self_instruct/")) and r["fault"] is None}
    keys = [key for key in sorted(seed_records) if key in parallel]
    for key in rng.sample(keys, min(len(keys), round(FAULTS["wrong_language"] * size))):
        index = seed_records[key]
        zh_task, en_task = parallel[key]
        zh_prompt = records[index]["task"] == "instruct_zh"
        prompt = seed_task(zh_task if zh_prompt else en_task)[0]
        answer, own = seed_task(en_task if zh_prompt else zh_task)[1], seed_task(zh_task if zh_prompt else en_task)[1]
        if bool(_CJK.search(answer)) != bool(_CJK.search(own)):
            fault, detail = "wrong_language", f"{'zh' if zh_prompt else 'en'} prompt, " \
                                              f"{'en' if zh_prompt else 'zh'} reply"
        else:  # both answers Chinese (a translation) or neither (code, a number, a letter): the answer is right
            fault, detail = None, "the other language's answer, in the same language as this one's: no fault"
        records[index] = {**records[index], "conversations": conversation(prompt, answer), "fault": fault,
                          "detail": detail}
    # Duplicates last, of records that are still clean (a copy of a replaced record would duplicate nothing) and
    # not replaced at all (so the pool is the one built before the no-fault label above existed).
    clean = [i for i, r in enumerate(records) if r["fault"] is None and r["detail"] is None]
    added = []
    for fault, edit in (("exact_duplicate", exact_copy), ("near_duplicate", near_edit)):
        for _ in range(round(FAULTS[fault] * size)):
            original = rng.choice(clean)
            copy = with_reply(records[original], edit(reply(records[original]), rng))
            added.append({**copy, "fault": fault, "detail": None, "of": original})
    return records + added


def char_ngrams(text: str, n: int) -> set[str]:
    text = " ".join(text.split())
    return {text[i:i + n] for i in range(max(1, len(text) - n + 1))}


def overlap_check(pool: list[dict], held: dict[str, list], n: int = 20, limit: float = 0.5) -> dict:
    """Drop held-out examples whose prompt shares more than `limit` of its character n-grams with the pool's
    prompts (contamination); report the largest overlap left."""
    seen: set[str] = set()
    for record in pool:
        for turn in record["conversations"]:
            if turn["from"] == "human":
                seen |= char_ngrams(turn["value"], n)
    report = {}
    for task, conversations in held.items():
        kept, dropped, largest = [], 0, 0.0
        for conv in conversations:
            grams = char_ngrams(" ".join(t["value"] for t in conv if t["from"] == "human"), n)
            share = len(grams & seen) / len(grams)
            if share > limit:
                dropped += 1
            else:
                kept.append(conv)
                largest = max(largest, share)
        held[task] = kept
        report[task] = {"kept": len(kept), "dropped": dropped, "largest_overlap_kept": round(largest, 3)}
    return {"ngram_chars": n, "drop_above": limit, "tasks": report}


def build(data: Path, out: Path, scale: float, heldout: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    pool, held, parallel = load_sources(data, rng, scale, heldout)
    records = inject(pool, parallel, rng)
    order = list(range(len(records)))
    rng.shuffle(order)
    position = {index: place for place, index in enumerate(order)}
    # A duplicate comes after its original (clean keeps the first occurrence, so the copy is the one to remove).
    for index, record in enumerate(records):
        if "of" in record and position[index] < position[record["of"]]:
            a, b = position[index], position[record["of"]]
            order[a], order[b] = order[b], order[a]
            position[index], position[record["of"]] = b, a
    for record in records:
        if "of" in record:
            record["detail"] = f"copy of r{position[record['of']]:05d}"
    records = [records[i] for i in order]
    out.mkdir(parents=True, exist_ok=True)
    overlap = overlap_check(records, held)
    with (out / "pool.jsonl").open("w", encoding="utf-8") as pool_file, \
            (out / "pool.labels.jsonl").open("w", encoding="utf-8") as label_file:
        for number, record in enumerate(records):
            record_id = f"r{number:05d}"
            pool_file.write(json.dumps({"id": record_id, "task": record["task"],
                                        "conversations": record["conversations"]}, ensure_ascii=False) + "\n")
            label_file.write(json.dumps({"id": record_id, "task": record["task"], "source": record["source"],
                                         "fault": record["fault"], "detail": record["detail"]},
                                        ensure_ascii=False) + "\n")
    (out / "heldout").mkdir(exist_ok=True)
    for task, conversations in held.items():
        (out / "heldout" / f"{task}.jsonl").write_text(
            "".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in conversations),
            encoding="utf-8")
    summary = {"records": len(records), "clean": sum(r["fault"] is None for r in records),
               "tasks": dict(Counter(r["task"] for r in records)),
               "faults": dict(Counter(r["fault"] for r in records if r["fault"])),
               "replaced_without_fault": sum(r["fault"] is None and r["detail"] is not None for r in records),
               "seed": seed, "scale": scale, "overlap": overlap}
    (out / "build.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir()))
    parser.add_argument("--out", default="outputs/noisy-pool/data")
    parser.add_argument("--scale", type=float, default=1.0, help="share of each source's pool records")
    parser.add_argument("--heldout", type=int, default=100, help="held-out examples per task (half for instruct_en)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build(Path(args.data), Path(args.out), args.scale, args.heldout, args.seed), indent=2,
                     ensure_ascii=False))


if __name__ == "__main__":
    main()
