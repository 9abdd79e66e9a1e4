"""`weitiao data select --report`: a held-out split never selected from, a random subset of the same size, the
fault-like records marked, a probe trained on each subset and the held-out losses compared."""

import json
import random

from tests.conftest import write_jsonl
from weitiao.cli import main

WORDS = ("apple pear plum fig kiwi lime mango peach grape melon lemon cherry river stone cloud window garden "
         "yellow quiet bright seven north winter market bread letter music paper silver forest candle").split()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_report_compares_the_selection_with_random_on_held_out_data(tmp_path, tiny_model_dir, capsys):
    rng = random.Random(0)
    rows = [{"id": i, "instruction": "Describe " + " ".join(rng.sample(WORDS, 3)) + ".",
             "output": " ".join(rng.sample(WORDS, 12)).capitalize() + "."} for i in range(36)]
    rows[5]["output"] = "I'm sorry, but I can't help with that request."
    rows.append(dict(rows[3], id=99))  # an exact duplicate of record 4
    source = write_jsonl(tmp_path / "pool.jsonl", rows)
    out = tmp_path / "picked.jsonl"
    main(["data", "select", str(source), str(out), "--method", "ifd", "--ratio", "0.3", "--model", tiny_model_dir,
          "--max-length", "64", "--report", "--report-heldout", "0.2", "--no-cache"])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "picked.report.json").read_text())

    heldout = {row["id"] for row in read_jsonl(tmp_path / "picked.heldout.jsonl")}
    selected = {row["id"] for row in read_jsonl(out)}
    random_subset = {row["id"] for row in read_jsonl(tmp_path / "picked.random.jsonl")}
    assert len(heldout) == round(0.2 * len(rows)) == report["heldout"]
    assert not heldout & selected and not heldout & random_subset  # never selected from the held-out share
    assert len(random_subset) == len(selected) == report["rows"]["selected"]["examples"] > 0
    assert report["pool"] == len(rows) - len(heldout)

    faults = read_jsonl(tmp_path / "picked.faults.jsonl")
    assert {(f["record"], f["rule"]) for f in faults} == {(6, "refusal"), (37, "exact_duplicate")}
    for name, subset in (("selected", selected), ("random", random_subset)):
        assert report["rows"][name]["fault_like"] == sum(
            f["selected" if name == "selected" else "in_random"] for f in faults)
        assert report["rows"][name]["fault_like"] == len(subset & {5, 99})
    assert report["heldout_scored"] == len(heldout - {5, 99})
    losses = {name: row["heldout_loss"] for name, row in report["rows"].items()}
    assert all(0 < loss < 20 for loss in losses.values())
    assert losses["selected"] != losses["base"] and losses["random"] != losses["base"]  # the probes trained
    assert "| random, same size |" in printed and "held-out response loss" in printed
    assert (tmp_path / "picked.report.md").read_text().startswith("# Selection report: ifd")
