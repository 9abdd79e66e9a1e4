"""Writes the demo dataset shipped in src/weitiao/demo/: turn a one-sentence bio into a fixed JSON record.

A small model does not know this output schema (keys, integer age, lower-case job) until it is fine-tuned,
so the gain is large and easy to measure by exact match. Deterministic: same seed, same files.
Run: python scripts/make_demo_data.py
"""

import json
import random
from pathlib import Path

FIRST = ["Maria", "Kenji", "Aisha", "Lars", "Priya", "Tom", "Chen", "Fatima", "Diego", "Olga", "Samuel", "Yuki",
         "Amara", "Pierre", "Nadia", "Ivan", "Lucia", "Omar", "Greta", "Ravi", "Hana", "Mateo", "Zoe", "Kwame",
         "Ingrid", "Tariq", "Mei", "Jonas", "Leila", "Pablo", "Sofia", "Arjun", "Elena", "Ben", "Noor", "Hugo"]
LAST = ["Lopez", "Tanaka", "Khan", "Berg", "Sharma", "Walker", "Wei", "Haddad", "Rossi", "Petrova", "Okafor",
        "Sato", "Mensah", "Dubois", "Novak", "Silva", "Fischer", "Ahmed", "Kim", "Jensen", "Costa", "Moreau",
        "Nguyen", "Schmidt", "Ali", "Park", "Larsen", "Garcia", "Ito", "Brown", "Mueller", "Reyes"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Oslo", "Pune", "Leeds", "Chengdu", "Beirut", "Milan", "Kazan", "Lagos",
          "Sapporo", "Accra", "Lyon", "Prague", "Recife", "Hamburg", "Cairo", "Busan", "Aarhus", "Porto", "Nantes",
          "Hanoi", "Dresden", "Karachi", "Seoul", "Bergen", "Seville", "Kyoto", "Denver", "Munich", "Manila"]
JOBS = ["nurse", "chef", "teacher", "pilot", "architect", "plumber", "dentist", "librarian", "farmer", "lawyer",
        "baker", "journalist", "electrician", "pharmacist", "photographer", "carpenter", "engineer", "translator",
        "accountant", "firefighter", "tailor", "veterinarian", "designer", "mechanic"]
SENTENCES = [
    "{name}, a {age}-year-old {job}, lives in {city}.",
    "Living in {city}, {age}-year-old {name} works as a {job}.",
    "{Job} {name} ({age}) is based in {city}.",
    "Meet {name}: {age} years old, {job} from {city}.",
    "{name} is {age} and works as a {job} in {city}.",
    "At {age}, {name} has become one of the best-known {job}s in {city}.",
    "Our new neighbour {name} moved to {city} last year; the {age}-year-old is a {job}.",
    "{city} {job} {name}, {age}, was interviewed on Tuesday.",
    "After years abroad, {name} ({age}) settled in {city} and now works as a {job}.",
    "Ask anyone in {city} about {name}: the {job} is {age} and always busy.",
]
INSTRUCTION = "Extract the person's details from the text as JSON."


def make(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    age, city, job = rng.randint(19, 78), rng.choice(CITIES), rng.choice(JOBS)
    text = rng.choice(SENTENCES).format(name=name, age=age, city=city, job=job, Job=job.capitalize())
    answer = json.dumps({"name": name, "age": age, "city": city, "job": job})
    return {"instruction": INSTRUCTION, "input": text, "output": answer}


def main() -> None:
    rng = random.Random(20261123)
    seen, rows = set(), []
    while len(rows) < 560:
        row = make(rng)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    folder = Path(__file__).resolve().parents[1] / "src" / "weitiao" / "demo"
    for name, part in (("train", rows[:480]), ("test", rows[480:])):
        with (folder / f"extract_{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in part:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(part)} records")


if __name__ == "__main__":
    main()
