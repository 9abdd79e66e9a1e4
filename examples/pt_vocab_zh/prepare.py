"""Build the Chinese corpus of this example from the shared real data (never copied into the repository):
the replies of alpaca_zh and the assistant turns of sharegpt_zh, one document each.

Every 20th document is held out (held_out.jsonl: tokens per character); the first 40 of those are the
perplexity set (held_out_small.jsonl), small enough to evaluate in a minute or two on a CPU.

python examples/pt_vocab_zh/prepare.py [--shared ../shared/data] [--out outputs/pt_vocab_zh/data]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def documents(shared: Path) -> list[str]:
    texts = [record["output"] for record in json.loads((shared / "alpaca_zh" / "alpaca_zh_demo.json").read_text())]
    with (shared / "sharegpt_zh" / "sharegpt_zh_1K_format.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            texts += [turn["value"] for turn in json.loads(line)["conversations"] if turn["from"] == "gpt"]
    return [text for text in texts if text.strip()]


def write(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("WEITIAO_SHARED_DATA")
                                                              or REPO.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=Path("outputs/pt_vocab_zh/data"))
    args = parser.parse_args()
    texts = documents(args.shared)
    held_out = texts[19::20]
    train = [text for index, text in enumerate(texts) if index % 20 != 19]
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "train.jsonl", train)
    write(args.out / "held_out.jsonl", held_out)
    write(args.out / "held_out_small.jsonl", held_out[:40])
    print(f"{len(train)} training documents ({sum(map(len, train)):,} characters), {len(held_out)} held out "
          f"({sum(map(len, held_out)):,} characters; the first 40: {sum(map(len, held_out[:40])):,}) in {args.out}")


if __name__ == "__main__":
    main()
