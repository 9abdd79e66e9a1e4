"""How many of the noisy pool's injected faults `weitiao data clean` finds, and at what cost, per setting.

  python bench/clean_rules.py --work outputs/noisy-pool        # the pool of bench/noisy_pool.py (built if missing)

Settings, all with language auto (the pool mixes Chinese and English): the text rules at their defaults; with the
model rules (--model: `mismatched` and the model's checks of `truncated`, by the record's own scores and against its
neighbours'); the same without the neighbourhood checks (neighbours 0); with mismatch_ifd 0.98; and the text rules
and the model rules with truncated_sentence. The model scores the records
the text rules keep, once: the settings share the passes through weitiao's score cache. Precision counts every
removal of a record without an injected label as wrong, though the sources have faults of their own (their
refusals, for one); `unlabelled_removed_by_rule` says which rules removed those.
Result: --results (default bench/results/noisy-pool-clean-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from common import device_name  # noqa: E402
from noisy_pool import MAX_LENGTH, detection, read_jsonl  # noqa: E402
from noisy_pool_data import build  # noqa: E402

from tests.conftest import shared_data_dir  # noqa: E402


def settings(model: str) -> dict[str, dict]:
    with_model = {"model": model, "max_length": MAX_LENGTH}
    return {"text rules": {},
            "text + model rules": with_model,
            "text + model rules, neighbours 0": {**with_model, "neighbours": 0},
            "text + model rules, mismatch_ifd 0.98": {**with_model, "mismatch_ifd": 0.98},
            "text rules + truncated_sentence": {"truncated_sentence": True},
            "text + model rules + truncated_sentence": {**with_model, "truncated_sentence": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir()))
    parser.add_argument("--work", default="outputs/noisy-pool")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="the pool's seed (another seed: other faults, records)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--results", help="default bench/results/noisy-pool-clean-<device>.json")
    args = parser.parse_args()

    from weitiao.config import CleanConfig, DataSource
    from weitiao.data.clean import clean_examples

    data = Path(args.work) / "data"
    if not (data / "build.json").is_file():
        build(Path(args.data), data, args.scale, heldout=100, seed=args.seed)
    labels = {r["id"]: r for r in read_jsonl(data / "pool.labels.jsonl")}
    rows = []
    for name, options in settings(args.model).items():
        config = CleanConfig(language="auto", **options)
        started = time.time()
        result = clean_examples(DataSource(path=str(data / "pool.jsonl")), config)
        found = detection({item.original["id"]: item.rule for item in result.removed}, labels)
        rows.append({"name": name, "options": options, "seconds": round(time.time() - started, 1), **found})
        print(f"{name}: recall {found['recall']:.1%}, precision {found['precision']:.1%} ({found['removed']} removed)"
              f"\n  {found['recall_by_fault']}\n  unlabelled {found['unlabelled_removed_by_rule']}", flush=True)
    device = device_name().split()[-1].split("-")[0].lower()
    results = Path(args.results or REPO / "bench" / "results" / f"noisy-pool-clean-{device}.json")
    results.write_text(json.dumps({"device": device, "pool": json.loads((data / "build.json").read_text()),
                                   "rows": rows}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"-> {results}")


if __name__ == "__main__":
    main()
