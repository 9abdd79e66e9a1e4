"""The comparison report: report.json (the numbers), report.md (the same numbers, readable) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weitiao.runs import RunFolder

# name in report.json -> (label, lower is better, format)
METRIC_LABELS = {
    "loss": ("eval loss (response tokens)", True, "{:.4f}"),
    "perplexity": ("perplexity (response tokens)", True, "{:.2f}"),
    "loss_all_tokens": ("eval loss (all tokens)", True, "{:.4f}"),
    "perplexity_all_tokens": ("perplexity (all tokens)", True, "{:.2f}"),
    "exact_match": ("exact match %", False, "{:.1f}"),
    "json_valid": ("valid JSON %", False, "{:.1f}"),
    "json_field_accuracy": ("JSON field accuracy %", False, "{:.1f}"),
    "rouge-1": ("ROUGE-1", False, "{:.2f}"),
    "rouge-2": ("ROUGE-2", False, "{:.2f}"),
    "rouge-l": ("ROUGE-L", False, "{:.2f}"),
    "bleu-4": ("BLEU-4", False, "{:.2f}"),
    "choice_accuracy": ("choice accuracy % (constrained)", False, "{:.1f}"),
    "choice_macro_f1": ("choice macro F1 %", False, "{:.1f}"),
    "sql_execution_match": ("SQL execution match %", False, "{:.1f}"),
    "sql_executable": ("SQL that runs %", False, "{:.1f}"),
    "pair_accuracy": ("pairs ranked right % (chosen more likely; reward models: higher reward)", False, "{:.1f}"),
    "pair_accuracy_per_token": ("pairs ranked right % (per-token log-prob)", False, "{:.1f}"),
    "pair_margin": ("margin chosen - rejected (log-prob; reward models: reward)", False, "{:.3f}"),
    "chosen_logps": ("log-prob of chosen replies", False, "{:.2f}"),
    "rejected_logps": ("log-prob of rejected replies", True, "{:.2f}"),
    "tool_call_accuracy": ("tool calls: right function %", False, "{:.1f}"),
    "tool_argument_match": ("tool calls: right function and arguments %", False, "{:.1f}"),
    "tool_valid_json": ("tool calls that parse (valid JSON) %", False, "{:.1f}"),
    "tool_no_call_accuracy": ("no call where none is needed %", False, "{:.1f}"),
}
# Sample fields shown in report.md and on the terminal, in this order, when a report has them.
SAMPLE_FIELDS = {"prompt": "prompt", "base": "base", "tuned": "tuned", "base_choice": "base choice",
                 "tuned_choice": "tuned choice", "reference": "reference"}
# Benchmark metrics are named '<benchmark>/<lm-eval metric>' (mmlu/acc); lm-eval's scores are fractions (0-1).
BENCHMARK_METRIC_LABELS = {"acc": "accuracy", "acc_norm": "accuracy (length-normalised)",
                           "exact_match": "exact match"}


def metric_info(name: str) -> tuple[str, bool, str]:
    """(label, lower is better, format) of a metric in report.json."""
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    benchmark, slash, metric = name.partition("/")
    if slash:
        return f"{benchmark} {BENCHMARK_METRIC_LABELS.get(metric, metric)}", False, "{:.4f}"
    return name, False, "{:.4f}"


def metric_label(name: str, report: dict[str, Any]) -> str:
    """A metric's label in this report: with train_on: all the 'response-token' loss is over every token."""
    label = metric_info(name)[0]
    if name in ("loss", "perplexity") and report.get("loss_tokens") == "all":
        label = label.replace("(response tokens)", "(trained tokens: all)")
    return label


def _fmt(name: str, value: float) -> str:
    return metric_info(name)[2].format(value)


def compares(report: dict[str, Any]) -> bool:
    """Whether the report has a tuned model beside the base (`weitiao eval --model` alone scores one model)."""
    return all("tuned" in values for values in report["metrics"].values())


def table_header(report: dict[str, Any]) -> tuple[str, ...]:
    return ("metric", "base", "tuned", "change") if compares(report) else ("metric", "score")


def metric_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name, values in report["metrics"].items():
        label = metric_label(name, report)
        if "tuned" not in values:
            rows.append((label, _fmt(name, values["base"])))
            continue
        delta = values["delta"]
        rows.append((label, _fmt(name, values["base"]), _fmt(name, values["tuned"]),
                     ("+" if delta >= 0 else "") + _fmt(name, delta)))
    return rows


def format_table(report: dict[str, Any]) -> str:
    """The metric table as aligned plain text, for the terminal."""
    header = table_header(report)
    notes = "".join(f"note: {note}\n" for note in data_notes(report))
    rows = [header] + metric_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return notes + "\n".join(lines)


def format_samples(report: dict[str, Any], count: int | None = None, width: int = 300) -> str:
    count = report.get("num_samples_shown", 5) if count is None else count

    def clip(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    blocks = []
    for sample in report["samples"][:count]:
        blocks.append("\n".join(f"{label + ':':<14}{clip(sample[key])}" for key, label in SAMPLE_FIELDS.items()
                                 if key in sample))
    return "\n\n".join(blocks)


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the summary, the plots, then the samples."""
    return render_summary(report, plots=True) + render_samples(report)


def data_notes(report: dict[str, Any]) -> list[str]:
    """What of the eval data was not scored, or scored in a way to know about: examples dropped by truncation, eval
    sources cut to a share by their weight, several references per example."""
    data = report.get("eval_data") or {}
    notes = []
    dropped = sum(data.get("dropped", {}).values())
    if dropped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in data["dropped"].items())
        notes.append(f"{dropped} of {data['examples_in']} eval examples not scored ({reasons}; data.max_length "
                     f"{data['max_length']})")
    for subset in data.get("subsets", []):
        notes.append(f"{subset['path']}: a seeded random {subset['weight']:g} of it ({subset['used']} of "
                     f"{subset['records']} records; its weight)")
    if data.get("references_per_example", 0) > 1:
        notes.append(f"{data['references_per_example']:g} references per example on average: exact match on any, "
                     "ROUGE the best F1 over them, BLEU multi-reference")
    return notes


def render_summary(report: dict[str, Any], plots: bool = False) -> str:
    """What was evaluated and the base-vs-tuned table (with confusion matrices and benchmark subjects); with plots,
    the markdown links to the run folder's images."""
    examples = (f"- held-out pairs: {report['eval_examples']} (ranked by the reward model)"
                if report.get("stage") == "rm" else f"- eval examples: {report['eval_examples']} (loss)")
    if report.get("tool_points"):
        points = report["tool_points"]
        examples += (f"; {report['generation_examples']} replies generated at the assistant turns of tool "
                     f"conversations ({points['calls']} due to call tools, {points['replies']} due to answer in "
                     "text: the generation metrics score those)")
        if points.get("too_long"):
            examples += f"; {points['too_long']} turns skipped: prompt + max_new_tokens longer than the model's window"
    elif report["generation_examples"]:
        examples += f"; {report['generation_examples']} generated (extractor for exact match: {report['extractor']})"
    if report.get("choice_examples"):
        examples += (f"; {report['choice_examples']} scored by constrained choice among "
                     f"{', '.join(report['choices']['labels'])}")
    header = table_header(report)
    lines = ["# Evaluation: base vs fine-tuned" if compares(report) else "# Evaluation", ""]
    lines += [f"- run: `{report['run']}`"] if report.get("run") else []
    lines.append(f"- base model: `{report['base_model']}`")
    lines += [f"- method: {report['method']}"] if report.get("method") else []
    lines += [examples] if report["eval_examples"] else []
    if report.get("preference"):
        preference = report["preference"]
        lines.append(f"- held-out pairs with the base as reference (beta {preference['beta']}): reward accuracy "
                     f"{preference['reward_accuracy']:.1f}%, mean reward margin {preference['reward_margin']:.3f}")
    lines += [*(f"- {note}" for note in data_notes(report)), "",
              "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in metric_rows(report)]
    lines.append("")
    if plots:
        lines += [f"![training and validation loss]({RunFolder.LOSS_PLOT})", ""] if report.get("training_log") else []
        lines += [f"![metrics]({RunFolder.METRICS_PLOT})", ""]
    lines += _confusion_markdown(report.get("choices"))
    lines += _benchmark_markdown(report.get("benchmarks", []))
    return "\n".join(lines) + "\n"


def render_samples(report: dict[str, Any]) -> str:
    """The Samples section: prompt, reference, base and tuned answer of the first eval examples."""
    if not report["samples"]:
        return ""
    fields = [key for key in SAMPLE_FIELDS if key in report["samples"][0]]
    lines = ["## Samples", "", "| " + " | ".join(SAMPLE_FIELDS[key] for key in fields) + " |",
             "|" + "---|" * len(fields)]
    for sample in report["samples"][: report.get("num_samples_shown", 5)]:
        lines.append("| " + " | ".join(_markdown_cell(sample[key]) for key in fields) + " |")
    return "\n".join(lines) + "\n"


def _confusion_markdown(choices: dict[str, Any] | None) -> list[str]:
    """The confusion matrix of each model: one row per reference answer, one column per chosen answer."""
    if not choices:
        return []
    labels = choices["labels"]
    lines = ["## Constrained choice", "",
             f"Each answer ({', '.join(labels)}) is scored by its log-likelihood as the reply; the most likely is "
             "the model's choice. Rows: the reference; columns: the choice.", ""]
    for model in ("base", "tuned"):
        matrix = choices[model]
        correct = sum(matrix[k][k] for k in range(len(labels)))
        lines += [f"**{model}**: {correct} of {sum(map(sum, matrix))} right", "",
                  "| reference \\ choice | " + " | ".join(_markdown_cell(label) for label in labels) + " | total |",
                  "|---|" + "---:|" * (len(labels) + 1)]
        lines += [f"| {_markdown_cell(label)} | " + " | ".join(str(n) for n in row) + f" | {sum(row)} |"
                  for label, row in zip(labels, matrix)]
        lines.append("")
    return lines + ["![confusion matrices](confusion.png)", ""]


def _benchmark_markdown(benchmarks: list[dict[str, Any]]) -> list[str]:
    """How each benchmark ran, and its per-subject accuracies when it has subjects."""
    if not benchmarks:
        return []
    lines = ["## Benchmarks (lm-evaluation-harness)", ""]
    for benchmark in benchmarks:
        source = f"local files `{benchmark['path']}`" if benchmark["path"] else "lm-eval's own task"
        shots = benchmark["num_fewshot"]
        if shots is None:  # local tasks default to zero-shot; lm-eval's own tasks to their own setting
            shots = 0 if benchmark["path"] else "the task's default"
        limit = ""
        if benchmark["limit"]:
            limit = f" (the first {benchmark['limit']}" + (" of each subject)" if benchmark["subjects"] else ")")
        lines.append(f"- **{benchmark['name']}** ({benchmark['task']}, {source}): {benchmark['questions']} "
                     f"questions{limit}, few-shot examples: {shots}")
    for benchmark in benchmarks:
        if not benchmark["subjects"]:
            continue
        both = all("tuned" in scores for scores in benchmark["subjects"].values())
        lines += ["", f"### {benchmark['name']} by subject", "",
                  "| subject | base | tuned | change |" if both else "| subject | score |",
                  "|---|---:|---:|---:|" if both else "|---|---:|"]
        for subject, scores in benchmark["subjects"].items():
            for metric, base_value in scores["base"].items():
                label = subject if metric == "acc" else f"{subject} ({metric})"
                if not both:
                    lines.append(f"| {label} | {base_value:.4f} |")
                    continue
                tuned_value = scores["tuned"][metric]
                lines.append(f"| {label} | {base_value:.4f} | {tuned_value:.4f} | "
                             f"{tuned_value - base_value:+.4f} |")
    return lines + [""]


def plot_loss_curves(log: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    if not train and not evals:
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="training loss")
    if evals:
        axis.plot(*zip(*evals), marker="o", label="validation loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (response tokens)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_metrics(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["metrics"])
    figure, axes = plt.subplots(1, len(names), figsize=(max(6, 1.9 * len(names)), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        values = report["metrics"][name]
        models = [model for model in ("base", "tuned") if model in values]
        bars = axis.bar(models, [values[model] for model in models], color=["#9aa5b1", "#2f80ed"][:len(models)])
        axis.bar_label(bars, labels=[_fmt(name, values[model]) for model in models], fontsize=8)
        axis.set_title(metric_label(name, report), fontsize=8)
        axis.tick_params(labelsize=8)
        axis.margins(y=0.2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_confusion(choices: dict[str, Any], path: Path) -> None:
    """The base and the tuned confusion matrices side by side, counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = choices["labels"]
    size = 1.2 + 0.6 * len(labels)
    figure, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size + 0.6))
    peak = max(max(map(max, choices[model])) for model in ("base", "tuned")) or 1
    for axis, model in zip(axes, ("base", "tuned")):
        matrix = choices[model]
        axis.imshow(matrix, cmap="Blues", vmin=0, vmax=peak)
        for r, row in enumerate(matrix):
            for c, count in enumerate(row):
                axis.text(c, r, str(count), ha="center", va="center", fontsize=9,
                          color="white" if count > peak / 2 else "black")
        axis.set_xticks(range(len(labels)), labels, fontsize=8)
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        axis.set_xlabel("choice", fontsize=8)
        axis.set_ylabel("reference", fontsize=8)
        axis.set_title(model, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(run: RunFolder, report: dict[str, Any]) -> None:
    """report.json in the run folder, and its renderings: the plots, report.md, predictions.jsonl."""
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_report(report)
    plot_loss_curves(report.get("training_log", []), run.path / RunFolder.LOSS_PLOT)
    plot_metrics(report, run.path / RunFolder.METRICS_PLOT)
    if report.get("choices"):
        plot_confusion(report["choices"], run.path / RunFolder.CONFUSION_PLOT)
    (run.path / RunFolder.REPORT_MARKDOWN).write_text(render_markdown(report), encoding="utf-8")
    with (run.path / RunFolder.PREDICTIONS).open("w", encoding="utf-8") as handle:
        for sample in report["samples"]:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
