"""Writes the small datasets the recipes in examples/ ship, each in the file layout of the public dataset it stands
in for (named in each recipe's README), so a recipe's config reads the public files with only paths changed.

The records are generated from templates with seeded randomness: realistic in form and schema, small enough to
fine-tune on a CPU in minutes. Deterministic: same seed, same files. Run: python scripts/make_recipe_data.py
"""

from __future__ import annotations

import json
import random
import sqlite3
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_json_array(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def unique(make, count: int, rng: random.Random, key: str) -> list[dict[str, Any]]:
    """`count` records from make(rng) with distinct `key` values."""
    seen, rows = set(), []
    for _ in range(count * 50):
        row = make(rng)
        if row[key] not in seen:
            seen.add(row[key])
            rows.append(row)
        if len(rows) == count:
            return rows
    raise RuntimeError(f"could not make {count} distinct records")


# ---------------------------------------------------------------------------------------------
# Recipe 1b: school math word problems (BELLE school_math_0.25M layout: JSON Lines of instruction/input/output).

ZH_NAMES = ["小明", "小红", "小华", "小刚", "小丽", "小军", "小芳", "小强", "乐乐", "丁丁", "明明", "圆圆"]
ZH_ITEMS = [("苹果", "个"), ("铅笔", "支"), ("故事书", "本"), ("气球", "个"), ("彩笔", "支"), ("橘子", "个"),
            ("邮票", "张"), ("贴纸", "张"), ("鸡蛋", "个"), ("糖果", "颗"), ("作业本", "本"), ("玻璃球", "颗")]
ZH_GOODS = [("钢笔", "支"), ("笔记本", "本"), ("足球", "个"), ("水杯", "个"), ("书包", "个"), ("跳绳", "根")]


def _math_problem(rng: random.Random) -> tuple[str, str]:
    a_name, b_name = rng.sample(ZH_NAMES, 2)
    item, unit = rng.choice(ZH_ITEMS)
    kind = rng.randrange(12)
    if kind == 0:
        a, b = rng.randint(12, 68), rng.randint(9, 57)
        q = rng.choice([f"{a_name}有{a}{unit}{item}，{b_name}有{b}{unit}{item}。两人一共有多少{unit}{item}？",
                        f"{a_name}收集了{a}{unit}{item}，{b_name}收集了{b}{unit}。他们一共收集了多少{unit}？"])
        s = (f"{a_name}有{a}{unit}，{b_name}有{b}{unit}，求一共有多少，用加法。\n"
             f"{a} + {b} = {a + b}（{unit}）\n答：两人一共有{a + b}{unit}{item}。")
    elif kind == 1:
        a = rng.randint(30, 95)
        b = rng.randint(8, a - 5)
        q = rng.choice([f"{a_name}有{a}{unit}{item}，送给{b_name}{b}{unit}后，还剩多少{unit}？",
                        f"{a_name}原来有{a}{unit}{item}，用掉了{b}{unit}，还剩几{unit}{item}？"])
        s = (f"求还剩多少，用原来的数量减去送出（用掉）的数量。\n{a} - {b} = {a - b}（{unit}）\n"
             f"答：还剩{a - b}{unit}{item}。")
    elif kind == 2:
        a, b = rng.randint(4, 12), rng.randint(3, 9)
        q = f"每盒{item}有{a}{unit}，{a_name}买了{b}盒，一共有多少{unit}{item}？"
        s = (f"每盒{a}{unit}，{b}盒就是{b}个{a}，用乘法。\n{a} × {b} = {a * b}（{unit}）\n"
             f"答：一共有{a * b}{unit}{item}。")
    elif kind == 3:
        n, each = rng.randint(3, 9), rng.randint(3, 12)
        q = f"{a_name}把{n * each}{unit}{item}平均分给{n}个小朋友，每个小朋友分到几{unit}？"
        s = f"把总数平均分成{n}份，用除法。\n{n * each} ÷ {n} = {each}（{unit}）\n答：每个小朋友分到{each}{unit}。"
    elif kind == 4:
        good, good_unit = rng.choice(ZH_GOODS)
        price, n = rng.randint(3, 25), rng.randint(2, 4)
        paid = ((price * n) // 10 + 1) * 10 + rng.choice([0, 0, 10, 40])
        q = f"一{good_unit}{good}{price}元，{a_name}买了{n}{good_unit}，付给售货员{paid}元，应找回多少元？"
        s = (f"先算买{good}一共花的钱：\n{price} × {n} = {price * n}（元）\n再算应找回的钱：\n"
             f"{paid} - {price * n} = {paid - price * n}（元）\n答：应找回{paid - price * n}元。")
    elif kind == 5:
        a, bags, per = rng.randint(5, 30), rng.randint(2, 6), rng.randint(4, 10)
        q = f"{a_name}原来有{a}{unit}{item}，又买了{bags}袋，每袋{per}{unit}。现在一共有多少{unit}{item}？"
        s = (f"先算买来的{item}：\n{bags} × {per} = {bags * per}（{unit}）\n再加上原来的：\n"
             f"{a} + {bags * per} = {a + bags * per}（{unit}）\n答：现在一共有{a + bags * per}{unit}{item}。")
    elif kind == 6:
        a, k = rng.randint(6, 20), rng.randint(2, 5)
        q = f"{a_name}有{a}{unit}{item}，{b_name}的{item}是{a_name}的{k}倍。{b_name}比{a_name}多多少{unit}？"
        s = (f"先求{b_name}有多少{unit}：\n{a} × {k} = {a * k}（{unit}）\n再求{b_name}比{a_name}多多少：\n"
             f"{a * k} - {a} = {a * k - a}（{unit}）\n答：{b_name}比{a_name}多{a * k - a}{unit}{item}。")
    elif kind == 7:
        speed, hours = rng.choice([45, 50, 60, 65, 70, 80, 90]), rng.randint(2, 6)
        vehicle = rng.choice(["一辆汽车", "一列火车", "一辆货车", "一辆大巴"])
        q = f"{vehicle}每小时行驶{speed}千米，{hours}小时行驶多少千米？"
        s = (f"路程 = 速度 × 时间。\n{speed} × {hours} = {speed * hours}（千米）\n"
             f"答：{hours}小时行驶{speed * hours}千米。")
    elif kind == 8:
        length, width = rng.randint(6, 20), rng.randint(3, 9)
        place = rng.choice(["花坛", "菜地", "操场", "鱼池"])
        if rng.random() < 0.5:
            q = f"一个长方形{place}长{length}米，宽{width}米，它的周长是多少米？"
            perimeter = (length + width) * 2
            s = (f"长方形的周长 = （长 + 宽）× 2。\n（{length} + {width}）× 2 = {perimeter}（米）\n"
                 f"答：{place}的周长是{perimeter}米。")
        else:
            q = f"一个长方形{place}长{length}米，宽{width}米，它的面积是多少平方米？"
            s = (f"长方形的面积 = 长 × 宽。\n{length} × {width} = {length * width}（平方米）\n"
                 f"答：{place}的面积是{length * width}平方米。")
    elif kind == 9:
        father, child, years = rng.randint(30, 45), rng.randint(6, 12), rng.randint(3, 10)
        q = f"今年爸爸{father}岁，{a_name}{child}岁。{years}年后，爸爸比{a_name}大多少岁？"
        s = (f"两人的年龄差不会随时间改变。\n今年爸爸比{a_name}大：{father} - {child} = {father - child}（岁）\n"
             f"所以{years}年后爸爸仍然比{a_name}大{father - child}岁。\n答：爸爸比{a_name}大{father - child}岁。")
    elif kind == 10:
        part = rng.choice([2, 3, 4, 5])
        pages = part * rng.randint(12, 40)
        read = pages // part
        q = f"一本故事书有{pages}页，{a_name}第一天看了全书的{part}分之一，还剩多少页没有看？"
        s = (f"先算第一天看了多少页：\n{pages} ÷ {part} = {read}（页）\n再算还剩多少页：\n"
             f"{pages} - {read} = {pages - read}（页）\n答：还剩{pages - read}页没有看。")
    else:
        gap = rng.choice([2, 3, 4, 5, 6])
        length = gap * rng.randint(5, 20)
        q = f"在一条长{length}米的小路一边植树，每隔{gap}米种一棵，两端都要种，一共要种多少棵树？"
        s = (f"两端都种时，棵数 = 间隔数 + 1。\n间隔数：{length} ÷ {gap} = {length // gap}（个）\n"
             f"棵数：{length // gap} + 1 = {length // gap + 1}（棵）\n答：一共要种{length // gap + 1}棵树。")
    return "题目：" + q, s


def school_math(rng: random.Random) -> None:
    def make(rng: random.Random) -> dict[str, Any]:
        question, solution = _math_problem(rng)
        return {"instruction": question, "input": "", "output": solution}

    write_jsonl(EXAMPLES / "chat_zh" / "data" / "school_math.json", unique(make, 200, rng, "instruction"))


# ---------------------------------------------------------------------------------------------
# Recipe 2: dialogue summaries (SAMSum layout: a JSON array of {id, dialogue, summary}).

PEOPLE = [("Anna", "she"), ("Ben", "he"), ("Chloe", "she"), ("Dan", "he"), ("Emma", "she"), ("Felix", "he"),
          ("Grace", "she"), ("Harry", "he"), ("Isla", "she"), ("Jack", "he"), ("Kate", "she"), ("Leo", "he"),
          ("Mia", "she"), ("Noah", "he"), ("Olivia", "she"), ("Paul", "he"), ("Rosa", "she"), ("Sam", "he"),
          ("Tina", "she"), ("Victor", "he"), ("Wendy", "she"), ("Zach", "he"), ("Lucy", "she"), ("Omar", "he")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["9:30", "10", "11:15", "12:30", "1", "2:45", "4", "5:30", "6", "7", "7:30", "8"]
PLACES = ["the Thai place", "Luigi's", "the café on Market Street", "the new sushi bar", "the food court",
          "the pub near the station", "Rosa's Kitchen", "the burger place"]


def _his(pronoun: str) -> str:
    return "his" if pronoun == "he" else "her"


def _dialogue(rng: random.Random) -> tuple[str, str]:
    (a, a_p), (b, b_p), (c, _) = rng.sample(PEOPLE, 3)
    day, time = rng.choice(DAYS), rng.choice(TIMES)
    kind = rng.randrange(15)
    if kind == 0:
        meal, place = rng.choice(["lunch", "dinner", "breakfast"]), rng.choice(PLACES)
        lines = [f"{a}: Are we still on for {meal} on {day}?", f"{b}: Yes! {time} at {place}?",
                 f"{a}: Perfect. I'll book a table.", f"{b}: Great, see you there."]
        summary = f"{a} and {b} will have {meal} at {place} on {day} at {time}. {a} will book a table."
    elif kind == 1:
        road, minutes = rng.choice(["the ring road", "the bridge", "Main Street", "the motorway"]), rng.choice(
            [10, 15, 20, 30, 40])
        lines = [f"{a}: I'm stuck in traffic on {road} 😩", f"{a}: I'll be about {minutes} minutes late.",
                 f"{b}: No worries, we'll start without you.", f"{a}: Sorry! Save me a seat please.", f"{b}: Will do."]
        summary = (f"{a} is stuck in traffic on {road} and will be about {minutes} minutes late. {b} will start "
                   f"without {'him' if a_p == 'he' else 'her'} and save {'him' if a_p == 'he' else 'her'} a seat.")
    elif kind == 2:
        item = rng.choice(["drill", "tent", "camera", "bike", "ladder", "projector", "suitcase"])
        lines = [f"{a}: Hey, can I borrow your {item} for the weekend?", f"{b}: Sure, but I need it back by {day}.",
                 f"{a}: Deal. Can I pick it up tonight?", f"{b}: Yes, I'm home after {time}."]
        summary = (f"{b} will lend {a} {_his(b_p)} {item} for the weekend. {a} will pick it up tonight after "
                   f"{time} and return it by {day}.")
    elif kind == 3:
        x, y = rng.sample(["milk", "bread", "eggs", "coffee", "tomatoes", "rice", "bananas", "cheese", "yoghurt"], 2)
        lines = [f"{a}: Are you at the supermarket?", f"{b}: Yes, why?", f"{a}: Could you get {x} and {y}?",
                 f"{b}: OK. Anything else?", f"{a}: No, that's all. Thank you!"]
        summary = f"{b} is at the supermarket and will buy {x} and {y} for {a}."
    elif kind == 4:
        group = rng.choice(["the office", "the climbing club", "our old class", "the choir", "the football team"])
        lines = [f"{a}: {c}'s birthday is on {day}. Shall we throw a surprise party?",
                 f"{b}: Good idea! I can bake a cake.", f"{a}: I'll invite everyone from {group}.",
                 f"{b}: Let's do it at my place.", f"{a}: Perfect, don't tell {c}!"]
        summary = (f"{a} and {b} are planning a surprise birthday party for {c} on {day} at {b}'s place. {b} will "
                   f"bake a cake and {a} will invite everyone from {group}.")
    elif kind == 5:
        doc = rng.choice(["budget report", "sales presentation", "project plan", "quarterly review", "offer"])
        before = DAYS[(DAYS.index(day) - 1) % 7]
        lines = [f"{a}: Did you finish the {doc}?", f"{b}: Almost, I need one more day.",
                 f"{a}: The client wants it on {day} morning.", f"{b}: OK, I'll send it to you on {before} evening.",
                 f"{a}: Thanks, that works."]
        summary = (f"{b} hasn't finished the {doc} yet. {b} will send it to {a} on {before} evening, as the client "
                   f"wants it on {day} morning.")
    elif kind == 6:
        pet, city, n = (rng.choice(["cat", "dog", "rabbit", "parrot", "fish"]),
                        rng.choice(["Berlin", "Lisbon", "Madrid", "Prague", "Vienna", "Dublin"]), rng.randint(2, 9))
        lines = [f"{a}: Could you feed my {pet} while I'm in {city}?", f"{b}: Sure! How long are you away?",
                 f"{a}: {n} days. The key is under the mat.", f"{b}: No problem. Have a nice trip!"]
        summary = f"{a} is going to {city} for {n} days and {b} will feed {a}'s {pet}. The key is under the mat."
    elif kind == 7:
        movie = rng.choice(["the new Bond film", "Dune", "the Pixar film", "that French comedy", "the horror film"])
        cinema = rng.choice(["the Odeon", "the Roxy", "the cinema in the mall", "the Arts Centre"])
        lines = [f"{a}: Movie tonight? {movie[0].upper() + movie[1:]} is on at {cinema}.", f"{b}: What time?",
                 f"{a}: 9:45", f"{b}: Too late for me. How about {day}?", f"{a}: Fine, {day} it is."]
        summary = f"{a} and {b} will go to see {movie} at {cinema} on {day} instead of tonight."
    elif kind == 8:
        part, cost = rng.choice(["clutch", "battery", "gearbox", "brakes", "alternator"]), rng.choice(
            [150, 200, 320, 450, 600, 800])
        lines = [f"{a}: My car broke down again.", f"{b}: Oh no! What happened?",
                 f"{a}: The {part}. The garage says it'll cost ${cost}.",
                 f"{b}: Ouch. Do you need a lift to work tomorrow?", f"{a}: That would be great, thanks!"]
        summary = (f"{a}'s car broke down and repairing the {part} will cost ${cost}. {b} will give {a} a lift to "
                   "work tomorrow.")
    elif kind == 9:
        subject = rng.choice(["statistics", "chemistry", "history", "economics", "biology", "French"])
        lines = [f"{a}: Are you coming to the study group for the {subject} exam?", f"{b}: When is it?",
                 f"{a}: {day} at {time}, in the library.", f"{b}: I'll be there. Can you bring your notes?",
                 f"{a}: Sure."]
        summary = (f"{a} and {b} will meet for the {subject} exam study group on {day} at {time} in the library. "
                   f"{a} will bring {_his(a_p)} notes.")
    elif kind == 10:
        item = rng.choice(["keys", "glasses", "phone charger", "wallet", "umbrella", "headphones"])
        it = "them" if item.endswith("s") else "it"
        place = rng.choice(["the car", "the kitchen", "the meeting room", "your gym bag", "the bathroom"])
        lines = [f"{a}: Have you seen my {item}? I can't find {it} anywhere.",
                 f"{b}: I think you left {it} in {place}.", f"{a}: Oh right! Thanks."]
        summary = (f"{a} can't find {_his(a_p)} {item}. {b} thinks {a_p} left {it} in "
                   f"{place.replace('your', _his(a_p))}.")
    elif kind == 11:
        lines = [f"{a}: Gym after work?", f"{b}: Can't today, I have a dentist appointment.", f"{a}: Tomorrow then?",
                 f"{b}: Yes, {time} works for me."]
        summary = (f"{b} can't go to the gym today because of a dentist appointment. {a} and {b} will go tomorrow "
                   f"at {time}.")
    elif kind == 12:
        rise, month = rng.choice([50, 80, 100, 120, 150]), rng.choice(["March", "April", "June", "September"])
        lines = [f"{a}: The landlord called. The rent goes up by ${rise} from {month}.",
                 f"{b}: Seriously? That's a lot.", f"{a}: I know. Should we look for another flat?",
                 f"{b}: Let's talk about it tonight."]
        summary = (f"The landlord told {a} that the rent will go up by ${rise} from {month}. {a} and {b} will discuss "
                   f"tonight whether to look for another flat.")
    elif kind == 13:
        thing = rng.choice(["new shoes", "books", "laptop", "coffee machine", "birthday present for Mum"])
        spot = rng.choice(["desk", "bed", "shelf in the hall"])
        lines = [f"{a}: A package came for you today.", f"{b}: It must be my {thing}! Where did you put it?",
                 f"{a}: On your {spot}.", f"{b}: Thanks a lot!"]
        summary = f"A package with {b}'s {thing} arrived today. {a} put it on {b}'s {spot}."
    else:
        hill = rng.choice(["Snowdon", "Ben Nevis", "the Lake District", "Mount Tam", "the Blue Mountains"])
        lines = [f"{a}: Shall we go hiking in {hill} on Saturday?" if hill.startswith("the")
                 else f"{a}: Shall we go hiking on {hill} on Saturday?", f"{b}: Only if the weather is good.",
                 f"{a}: The forecast says sunny.", f"{b}: Then yes! Let's leave at {time}."]
        where = f"in {hill}" if hill.startswith("the") else f"on {hill}"
        summary = f"{a} and {b} will go hiking {where} on Saturday, leaving at {time}, as the forecast is sunny."
    return "\r\n".join(lines), summary


def dialogue_summaries(rng: random.Random) -> None:
    def make(rng: random.Random) -> dict[str, Any]:
        dialogue, summary = _dialogue(rng)
        return {"id": f"{rng.getrandbits(32):08x}", "summary": summary, "dialogue": dialogue}

    rows = unique(make, 190, rng, "dialogue")
    folder = EXAMPLES / "dialogue_summary" / "data"
    write_json_array(folder / "train.json", rows[:150])
    write_json_array(folder / "test.json", rows[150:])


# ---------------------------------------------------------------------------------------------
# Recipe 3: movie-review sentiment (IMDB layout: text and label; label words neg/pos, IMDB's class names).

TITLES = ["The Long Harbour", "Midnight Circuit", "Paper Lanterns", "The Last Orchard", "Iron Meridian",
          "Blue Static", "A Winter in Oslo", "The Glass Detective", "Neon Tide", "Seven Small Rooms", "Red Desert Road",
          "The Cartographer", "Quiet Engines", "Hollow Crown Heights", "Sunday Fever", "The Silent Orbit"]
OPENINGS = ["I watched {t} last night.", "Saw {t} at the cinema with friends.", "Finally got around to {t}.",
            "{t} was on my list for months.", "My sister recommended {t}.", "We rented {t} for a quiet evening.",
            "I went into {t} knowing nothing about it."]
GOOD = {
    "acting": ["The lead gives a raw, completely convincing performance.", "Every actor seems to live their part.",
               "The cast has real chemistry, especially the two brothers."],
    "plot": ["The story keeps surprising you without ever cheating.", "The script is tight and clever.",
             "The plot builds slowly to a genuinely moving finale."],
    "look": ["The cinematography is gorgeous; some shots look like paintings.",
             "The city at night has never looked better on screen."],
    "music": ["The score is beautiful and never overbearing.", "The soundtrack alone is worth the ticket."],
    "pace": ["Two hours flew by.", "The pacing is just right."],
}
BAD = {
    "acting": ["The acting is wooden and the dialogue sounds read off cards.", "The lead looks bored in every scene.",
               "Nobody in the cast seems to believe a word they say."],
    "plot": ["The plot makes no sense and the twist is obvious from the first scene.",
             "The script is a mess of clichés.", "Nothing happens for the first hour, and then too much at once."],
    "look": ["It is shot so darkly you can barely see what is going on.", "The effects look cheap and unfinished."],
    "music": ["The music is loud and tells you what to feel every minute.", "The soundtrack is instantly forgettable."],
    "pace": ["It drags terribly.", "I checked my watch three times."],
}
VERDICTS = {"pos": ["Highly recommended.", "One of the best films I've seen this year.", "I'd happily watch it again.",
                    "Go and see it.", "A small gem. 9/10.", "Loved it."],
            "neg": ["Avoid.", "A waste of two hours.", "I can't recommend it.", "Skip this one. 3/10.",
                    "What a disappointment.", "I wanted to like it, but no."]}


def _review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["neg", "pos"])
    main, other = (GOOD, BAD) if label == "pos" else (BAD, GOOD)
    aspects = rng.sample(list(GOOD), 3)
    sentences = [rng.choice(OPENINGS).format(t=rng.choice(TITLES))]
    sentences += [rng.choice(main[aspect]) for aspect in aspects[:2]]
    if rng.random() < 0.55:  # most reviews are mixed: one point against the overall verdict
        sentences.append(rng.choice(["That said, ", "Still, ", "To be fair, ", "On the other hand, "])
                         + (lambda s: s[0].lower() + s[1:])(rng.choice(other[aspects[2]])))
    if rng.random() < 0.8:
        sentences.append(rng.choice(VERDICTS[label]))
    return " ".join(sentences), label


def movie_reviews(rng: random.Random) -> None:
    def make(rng: random.Random) -> dict[str, Any]:
        text, label = _review(rng)
        return {"text": text, "label": label}

    rows = unique(make, 300, rng, "text")
    folder = EXAMPLES / "sentiment" / "data"
    write_jsonl(folder / "train.jsonl", rows[:240])
    write_jsonl(folder / "test.jsonl", rows[240:])


# ---------------------------------------------------------------------------------------------
# Recipe 4: questions about weitiao's documentation (databricks-dolly-15k layout: instruction, context, response,
# category). The passages are the descriptions of weitiao's config keys, taken from the config classes.


def _config_keys() -> list[tuple[str, str, Any]]:
    """(dotted key, description, default) of every documented scalar config key."""
    sys.path.insert(0, str(EXAMPLES.parent / "src"))
    from pydantic import BaseModel

    from weitiao.config import Config

    keys = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
            elif field.description and not field.is_required() and "\n" not in field.description:
                default = field.get_default(call_default_factory=True)
                if isinstance(default, (str, int, float, bool)) or default is None:
                    keys.append((f"{prefix}{name}", field.description, default))

    walk(Config, "")
    return keys


def _yaml_value(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def docs_questions(rng: random.Random) -> None:
    keys = _config_keys()
    rows = []
    for key, description, default in keys:
        section = key.rsplit(".", 1)[0] if "." in key else ""
        neighbours = [k for k in keys if k[0] != key and (k[0].rsplit(".", 1)[0] if "." in k[0] else "") == section]
        passage = rng.sample(neighbours, min(2, len(neighbours))) + [(key, description, default)]
        rng.shuffle(passage)
        context = "\n".join(f"- `{k}` (default: `{_yaml_value(v)}`): {d}" for k, d, v in passage)
        questions = [
            (rng.choice([f"What is the default value of {key}?", f"What does {key} default to?",
                         f"If I don't set {key}, what value does weitiao use?"]),
             f"The default value of `{key}` is `{_yaml_value(default)}`."),
            (rng.choice([f"What does {key} do?", f"What is {key} for?", f"Explain the {key} setting."]),
             f"`{key}`: {description}"),
        ]
        for question, answer in questions:
            rows.append({"instruction": question, "context": context, "response": answer, "category": "closed_qa"})
    rng.shuffle(rows)
    write_jsonl(EXAMPLES / "docs_qa" / "data" / "docs_qa.jsonl", rows)


# ---------------------------------------------------------------------------------------------
# Recipe 5: ad copy from product attributes (ADGEN/AdvertiseGen layout: JSON Lines of content/summary).

ADGEN_ATTRIBUTES: dict[str, dict[str, list[str]]] = {
    "版型": {"宽松": ["宽松的版型穿着舒适自在", "宽松的廓形不挑身材"],
             "修身": ["修身的剪裁勾勒出好身材", "修身版型干净利落"],
             "显瘦": ["整体很显瘦", "视觉上拉长身形，十分显瘦"]},
    "材质": {"棉": ["纯棉面料柔软亲肤", "棉质面料透气吸汗"],
             "雪纺": ["轻盈的雪纺面料飘逸灵动", "雪纺材质清爽透气"],
             "针织": ["针织面料柔软有弹性", "细腻的针织手感温暖舒适"],
             "牛仔布": ["牛仔面料耐穿又有型", "经典牛仔布挺括有质感"]},
    "颜色": {"白色": ["干净的白色清新百搭", "白色显得格外清爽"],
             "黑色": ["经典的黑色低调又高级", "黑色显瘦又好搭配"],
             "蓝色": ["温柔的蓝色透着文艺气息", "蓝色清爽又减龄"],
             "粉色": ["甜美的粉色很有少女感", "粉色温柔可爱"]},
    "风格": {"简约": ["简约的设计经典耐看", "风格简约大方"],
             "休闲": ["休闲的风格日常穿着很轻松", "带来慵懒的休闲感"],
             "通勤": ["适合通勤穿着，干练又大方", "通勤风格知性得体"],
             "复古": ["散发着浓浓的复古韵味", "复古的设计很有味道"],
             "街头": ["街头感十足，个性又酷帅", "充满潮流的街头气息"]},
    "图案": {"条纹": ["经典的条纹图案富有层次感", "条纹元素增添活力"],
             "印花": ["精致的印花点缀其间，很有看点", "印花图案灵动别致"],
             "纯色": ["纯色设计干净利落", "纯色款式百搭不出错"],
             "格子": ["格子图案复古又文艺", "格纹元素很有学院气息"],
             "刺绣": ["精美的刺绣工艺彰显品质", "刺绣细节精致用心"]},
    "领型": {"圆领": ["圆领设计修饰脸型", "简洁的圆领舒适不勒"],
             "V领": ["V领设计修饰颈部线条", "V领显脸小又优雅"],
             "翻领": ["翻领设计干练有型", "翻领增添精神感"],
             "立领": ["立领设计利落挺括", "立领衬托出好气质"]},
    "袖型": {"泡泡袖": ["泡泡袖甜美减龄", "俏皮的泡泡袖很有少女感"],
             "落肩袖": ["落肩袖慵懒随性", "落肩设计修饰肩部线条"],
             "喇叭袖": ["喇叭袖灵动飘逸", "喇叭袖优雅有女人味"]},
}
ADGEN_TYPES = {"上衣": ["衬衫", "T恤", "卫衣", "毛衣", "外套"], "裙": ["连衣裙", "半身裙"], "裤": ["阔腿裤", "牛仔裤"]}
ADGEN_OPENINGS = ["这款{x}", "这件{x}", "这条{x}"]
ADGEN_ENDINGS = ["，日常出行或约会都很合适。", "，轻松穿出时尚感。", "，让你美美出街。", "，是衣橱里的必备单品。"]


def _advert(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(list(ADGEN_TYPES))
    garment = rng.choice(ADGEN_TYPES[category])
    names = ["版型", "材质", "颜色", "风格", "图案"] + (["领型", "袖型"] if category == "上衣" else [])
    chosen = sorted(rng.sample(names, rng.randint(3, 4)), key=names.index)
    pairs = [("类型", category)] + [(name, rng.choice(list(ADGEN_ATTRIBUTES[name]))) for name in chosen]
    style = "衣样式" if category == "上衣" else "裙型" if category == "裙" else "裤型"
    pairs.append((style, garment))
    content = "*".join(f"{name}#{value}" for name, value in pairs)
    opening = rng.choice(ADGEN_OPENINGS if garment not in ("阔腿裤", "牛仔裤", "半身裙") else ADGEN_OPENINGS[2:])
    phrases = [rng.choice(ADGEN_ATTRIBUTES[name][value]) for name, value in pairs[1:-1]]
    summary = opening.format(x=garment) + phrases[0] + "，" + "，".join(phrases[1:]) + rng.choice(ADGEN_ENDINGS)
    return content, summary


def adverts(rng: random.Random) -> None:
    def make(rng: random.Random) -> dict[str, Any]:
        content, summary = _advert(rng)
        return {"content": content, "summary": summary}

    rows = unique(make, 250, rng, "content")
    folder = EXAMPLES / "adgen" / "data"
    write_jsonl(folder / "train.json", rows[:210])
    write_jsonl(folder / "dev.json", rows[210:])


# ---------------------------------------------------------------------------------------------
# Recipe 6: text-to-SQL over a shop database (b-mc2/sql-create-context layout: a JSON array of question, context,
# answer, where context is the CREATE TABLE statements).

SCHEMA = "\n".join([
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, joined DATE);",
    "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price REAL);",
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, order_date DATE, status TEXT);",
    "CREATE TABLE order_items (order_id INTEGER, product_id INTEGER, quantity INTEGER);"])
CITIES = ["Leeds", "Bristol", "York", "Cardiff", "Belfast", "Glasgow"]
CATEGORIES = {"kitchen": ["Kettle", "Toaster", "Frying Pan", "Knife Set", "Blender"],
              "garden": ["Hose", "Rake", "Lawn Mower", "Plant Pot"],
              "office": ["Desk Lamp", "Office Chair", "Notebook", "Stapler", "Monitor Stand"],
              "toys": ["Puzzle", "Kite", "Board Game"]}
STATUSES = ["shipped", "delivered", "pending", "cancelled"]
CUSTOMER_NAMES = ["Alice Moore", "Bilal Hussain", "Carmen Diaz", "David Okoro", "Erin Walsh", "Fiona Grant",
                  "George Patel", "Hannah Kim", "Ian Murphy", "Julia Novak", "Kofi Mensah", "Laura Evans",
                  "Mohammed Ali", "Nina Rossi", "Oscar Lind", "Priya Nair", "Quinn Baker", "Ruth Adler"]


def _shop_database(rng: random.Random, path: Path) -> dict[str, Any]:
    customers = [(i + 1, name, rng.choice(CITIES), f"202{rng.randint(1, 4)}-{rng.randint(1, 12):02d}-"
                  f"{rng.randint(1, 28):02d}") for i, name in enumerate(CUSTOMER_NAMES)]
    products = []
    for category, names in CATEGORIES.items():
        for name in names:
            products.append((len(products) + 1, name, category, round(rng.uniform(3, 180), 2)))
    orders, items = [], []
    for order_id in range(1, 61):
        orders.append((order_id, rng.randint(1, len(customers)),
                       f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}", rng.choice(STATUSES)))
        for product in rng.sample(products, rng.randint(1, 3)):
            items.append((order_id, product[0], rng.randint(1, 4)))
    path.unlink(missing_ok=True)
    connection = sqlite3.connect(path)
    connection.executescript(SCHEMA)
    connection.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", customers)
    connection.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", products)
    connection.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", orders)
    connection.executemany("INSERT INTO order_items VALUES (?, ?, ?)", items)
    connection.commit()
    connection.close()
    return {"customers": customers, "products": products}


def _sql_question(rng: random.Random, db: dict[str, Any]) -> tuple[str, str]:
    city, category, status = rng.choice(CITIES), rng.choice(list(CATEGORIES)), rng.choice(STATUSES)
    product, customer = rng.choice(db["products"])[1], rng.choice(db["customers"])[1]
    price, year = rng.choice([10, 20, 25, 50, 75, 100]), rng.choice([2021, 2022, 2023])
    order = rng.randint(1, 60)
    templates = [
        (f"Which customers live in {city}?", f"SELECT name FROM customers WHERE city = '{city}'"),
        (f"How many products cost less than {price} pounds?", f"SELECT COUNT(*) FROM products WHERE price < {price}"),
        (f"What is the total value of order {order}?",
         "SELECT SUM(order_items.quantity * products.price) FROM order_items JOIN products ON "
         f"order_items.product_id = products.id WHERE order_items.order_id = {order}"),
        (f"How many customers live in {city}?", f"SELECT COUNT(*) FROM customers WHERE city = '{city}'"),
        (f"List the names of the products in the {category} category.",
         f"SELECT name FROM products WHERE category = '{category}'"),
        (f"What is the price of the {product}?", f"SELECT price FROM products WHERE name = '{product}'"),
        (f"Which products cost more than {price} pounds?", f"SELECT name FROM products WHERE price > {price}"),
        (f"How many orders have the status {status}?", f"SELECT COUNT(*) FROM orders WHERE status = '{status}'"),
        (f"What is the average price of {category} products?",
         f"SELECT AVG(price) FROM products WHERE category = '{category}'"),
        (f"Which customers joined after {year}?", f"SELECT name FROM customers WHERE joined > '{year}-12-31'"),
        (f"What is the most expensive product in the {category} category?",
         f"SELECT name FROM products WHERE category = '{category}' ORDER BY price DESC LIMIT 1"),
        (f"How many orders has {customer} placed?",
         f"SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id "
         f"WHERE customers.name = '{customer}'"),
        (f"How many units of the {product} have been ordered in total?",
         f"SELECT SUM(order_items.quantity) FROM order_items JOIN products ON order_items.product_id = products.id "
         f"WHERE products.name = '{product}'"),
        ("How many customers are there in each city?", "SELECT city, COUNT(*) FROM customers GROUP BY city"),
        ("How many products are there in each category?",
         "SELECT category, COUNT(*) FROM products GROUP BY category"),
        (f"List the {category} products from the cheapest to the most expensive.",
         f"SELECT name FROM products WHERE category = '{category}' ORDER BY price ASC"),
        (f"Which city does {customer} live in?", f"SELECT city FROM customers WHERE name = '{customer}'"),
        (f"List the dates of the orders placed by {customer}.",
         f"SELECT orders.order_date FROM orders JOIN customers ON orders.customer_id = customers.id "
         f"WHERE customers.name = '{customer}'"),
        ("What is the cheapest product?", "SELECT name FROM products ORDER BY price ASC LIMIT 1"),
        (f"How many {status} orders are from customers in {city}?",
         f"SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id "
         f"WHERE orders.status = '{status}' AND customers.city = '{city}'"),
    ]
    return rng.choice(templates)


def text_to_sql(rng: random.Random) -> None:
    folder = EXAMPLES / "text_to_sql" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    db = _shop_database(rng, folder / "shop.sqlite")

    def make(rng: random.Random) -> dict[str, Any]:
        question, answer = _sql_question(rng, db)
        return {"answer": answer, "question": question, "context": SCHEMA}

    rows = unique(make, 180, rng, "question")
    connection = sqlite3.connect(folder / "shop.sqlite")
    for row in rows:
        connection.execute(row["answer"]).fetchall()  # every reference runs
    connection.close()
    write_json_array(folder / "train.json", rows[:140])
    write_json_array(folder / "test.json", rows[140:])


def main() -> None:
    for make in (school_math, dialogue_summaries, movie_reviews, docs_questions, adverts, text_to_sql):
        make(random.Random(f"weitiao-recipes-{make.__name__}"))
    print(f"wrote the recipe datasets under {EXAMPLES}")


if __name__ == "__main__":
    main()
