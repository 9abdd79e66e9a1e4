"""`weitiao data select --report`: a held-out split never selected from, a random subset of the same size, the
fault-like records marked, a probe trained on each subset and the held-out losses compared."""

import json
import random
import statistics

from tests.conftest import write_jsonl
from weitiao.cli import main
from weitiao.eval.selection import verdict

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
    randoms = [{row["id"] for row in read_jsonl(tmp_path / name)}
               for name in ("picked.random.jsonl", "picked.random.2.jsonl", "picked.random.3.jsonl")]
    assert len(heldout) == round(0.2 * len(rows)) == report["heldout"]
    assert report["pool"] == len(rows) - len(heldout)
    assert len({frozenset(subset) for subset in randoms}) == 3  # three seeds, three draws
    runs = report["rows"]["random"]["runs"]
    assert [run["seed"] for run in runs] == [42, 43, 44]
    for subset, run in zip(randoms, runs):
        assert not heldout & subset  # never drawn from the held-out share
        assert len(subset) == run["examples"] == len(selected) == report["rows"]["selected"]["examples"] > 0
        assert run["fault_like"] == len(subset & {5, 99})
    assert not heldout & selected

    faults = read_jsonl(tmp_path / "picked.faults.jsonl")
    assert {(f["record"], f["rule"]) for f in faults} == {(6, "refusal"), (37, "exact_duplicate")}
    assert report["rows"]["selected"]["fault_like"] == sum(f["selected"] for f in faults) == len(selected & {5, 99})
    assert sum(f["in_random"] for f in faults) == sum(run["fault_like"] for run in runs)
    assert report["heldout_scored"] == len(heldout - {5, 99})

    losses = [run["heldout_loss"] for run in runs]
    assert all(0 < loss < 20 for loss in [*losses, report["rows"]["base"]["heldout_loss"]])
    assert all(loss != report["rows"]["base"]["heldout_loss"] for loss in losses)  # the probes trained
    assert report["rows"]["selected"]["heldout_loss"] != report["rows"]["base"]["heldout_loss"]
    assert report["rows"]["random"]["heldout_loss"] == round(statistics.mean(losses), 4)
    assert report["rows"]["random"]["heldout_loss_sd"] == round(statistics.stdev(losses), 4)
    assert report["verdict"] == verdict(report["rows"]["selected"]["heldout_loss"], losses)
    assert "| random, same size, seed 43 |" in printed and "| random: mean of 3 |" in printed
    assert "the mean of 3 random subsets" in printed
    assert (tmp_path / "picked.report.md").read_text().startswith("# Selection report: ifd")


def test_the_verdict_counts_the_gap_in_standard_deviations_of_the_random_subsets():
    spread = [1.60, 1.61, 1.59]  # standard deviation 0.01
    assert verdict(1.55, spread) == {"gap": 0.05, "sd": 0.01, "gap_in_sd": 5.0, "outcome": "better than random"}
    assert verdict(1.62, spread) == {"gap": -0.02, "sd": 0.01, "gap_in_sd": -2.0, "outcome": "within the noise"}
    assert verdict(1.64, spread)["outcome"] == "worse than random"
    assert verdict(1.57, spread)["outcome"] == "better than random"  # exactly 3 standard deviations
    assert verdict(1.58, [1.60]) == {"gap": 0.02, "sd": None, "gap_in_sd": None,
                                     "outcome": "one random subset: no spread to judge by"}
    assert verdict(1.60, [1.60, 1.60])["outcome"] == "within the noise"
    assert verdict(1.55, [1.60, 1.60])["outcome"] == "better than random"
