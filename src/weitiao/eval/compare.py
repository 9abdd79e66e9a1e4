"""Base vs fine-tuned, same data, same prompts: the numbers that show what a fine-tune changed."""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from weitiao.config import PREFERENCE_STAGES, Config, EvalConfig, ModelConfig
from weitiao.data.collate import PadCollator
from weitiao.data.dataset import build_datasets, row_tools
from weitiao.data.encode import prompt_messages, render
from weitiao.data.preference import PAIR_COLUMNS, PairCollator
from weitiao.data.templates import template_stops
from weitiao.data.tools import ToolFormat
from weitiao.errors import ConfigError, DataError
from weitiao.eval.benchmarks import BenchmarkSuite
from weitiao.eval.choices import choice_loglikelihoods, choice_metrics, choose, confusion_matrix
from weitiao.eval.generate import GenerationSettings, generate
from weitiao.eval.loss import evaluate_loss
from weitiao.eval.metrics import generation_metrics
from weitiao.eval.pairs import implicit_rewards, pair_logps, ranking_metrics, reward_model_metrics
from weitiao.eval.report import write_report
from weitiao.eval.sql import SqlDatabase, execution_scores
from weitiao.eval.tool_calls import decision_points, reference_texts, tool_metrics
from weitiao.models import load_model, load_tokenizer, pick_dtype
from weitiao.runs import RunFolder

LOSS_KEYS = ("loss", "perplexity", "loss_all_tokens", "perplexity_all_tokens")


def evaluate_model(model, tokenizer, eval_set, config: Config, desc: str = "",
                   benchmarks: BenchmarkSuite | None = None, database: SqlDatabase | None = None) -> dict[str, Any]:
    """Loss metrics on the whole eval split; generation metrics (and SQL execution match on `database`) and
    constrained-choice metrics on its first eval.max_examples conversations; the scores of eval.benchmarks when a
    suite of them is given."""
    settings = config.eval
    loader = DataLoader(eval_set.select_columns(["input_ids", "labels"]),
                        batch_size=config.train.per_device_eval_batch_size,
                        collate_fn=PadCollator(tokenizer.pad_token_id))
    started = time.time()
    losses = evaluate_loss(model, loader)
    metrics = {key: losses[key] for key in LOSS_KEYS}
    result: dict[str, Any] = {"metrics": metrics, "seconds": {"loss": time.time() - started}}
    if "tools" in eval_set.column_names and any(eval_set["tools"]) and settings.generation:
        calling = _tool_calling(model, tokenizer, eval_set, config, desc)
        metrics.update(calling.pop("metrics"))
        result["seconds"]["generation"] = calling.pop("seconds")
        result.update(calling)
    elif (settings.generation or settings.choices) and "messages" in eval_set.column_names \
            and eval_set[0]["messages"] is not None:
        rows = eval_set.select(range(min(settings.max_examples, len(eval_set))))
        prompts, references = zip(*(prompt_messages(m) for m in rows["messages"]))
        # Several references where the source maps several columns to the reply (the first is the reply).
        scored_against = [refs or [reply] for refs, reply in zip(rows["references"], references)] \
            if "references" in rows.column_names else list(references)
        locations = list(zip(rows["source"], rows["record"]))
        result.update(prompts=list(prompts), references=list(references))
        if settings.generation:
            started = time.time()
            predictions = generate(model, tokenizer, prompts, GenerationSettings(
                settings.max_new_tokens, settings.batch_size, settings.do_sample, settings.temperature,
                settings.top_p), stop_strings=template_stops(config.data),
                desc=f"generating ({desc})")
            result["seconds"]["generation"] = time.time() - started
            metrics.update(generation_metrics(predictions, scored_against, settings.extractor, settings.regex,
                                              settings.labels))
            if database is not None:
                metrics.update(execution_scores(predictions, references, database, locations))
            result["predictions"] = predictions
        if settings.choices:
            started = time.time()
            result.update(_constrained_choice(model, tokenizer, prompts, references, locations, config, desc))
            metrics.update(choice_metrics(result["confusion_matrix"]))
            result["seconds"]["choices"] = time.time() - started
    if "rejected_input_ids" in eval_set.column_names:
        started = time.time()
        result["pair_logps"], lengths = pair_logps(model, pair_loader(eval_set, tokenizer, config),
                                                   desc=f"scoring pairs ({desc})")
        metrics.update(ranking_metrics(result["pair_logps"], lengths))
        result["seconds"]["pairs"] = time.time() - started
    if benchmarks is not None:
        started = time.time()
        scores = benchmarks.evaluate(model, tokenizer, settings.batch_size)
        result["seconds"]["benchmarks"] = time.time() - started
        metrics.update(scores["metrics"])
        result["benchmarks"] = scores["benchmarks"]
    return result


def _tool_calling(model, tokenizer, eval_set, config: Config, desc: str) -> dict[str, Any]:
    """Replies at every assistant turn of the first eval.max_examples tool conversations: the tool-call metrics
    (weitiao.eval.tool_calls), and the generation metrics of the turns answered in text."""
    settings = config.eval
    rows = eval_set.select(range(min(settings.max_examples, len(eval_set))))
    points = decision_points(rows["messages"], [row_tools(row) for row in rows])
    # A late turn of a long conversation may not leave room for a reply in the model's window: skipped, counted.
    window = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 10**9
    fits = [len(tokenizer(render(tokenizer, p.prompt, add_generation_prompt=True, tools=p.tools),
                          add_special_tokens=False)["input_ids"]) + settings.max_new_tokens <= window for p in points]
    too_long = fits.count(False)
    points = [point for point, fit in zip(points, fits) if fit]
    started = time.time()
    predictions = generate(model, tokenizer, [p.prompt for p in points], GenerationSettings(
        settings.max_new_tokens, settings.batch_size, settings.do_sample, settings.temperature, settings.top_p),
        stop_strings=template_stops(config.data), desc=f"generating ({desc})", tools=[p.tools for p in points])
    metrics = tool_metrics(points, predictions, ToolFormat.of(tokenizer))
    replies = [index for index, point in enumerate(points) if not point.calls]
    if replies:
        metrics.update(generation_metrics([predictions[i] for i in replies],
                                          [points[i].reference["content"] for i in replies],
                                          settings.extractor, settings.regex, settings.labels))
    return {"metrics": metrics, "prompts": [p.prompt for p in points], "references": reference_texts(points),
            "predictions": predictions, "tool_points": {"calls": sum(p.calls for p in points),
                                                        "replies": len(replies), "too_long": too_long},
            "seconds": time.time() - started}


def pair_loader(eval_set, tokenizer, config: Config) -> DataLoader:
    return DataLoader(eval_set.select_columns(list(PAIR_COLUMNS)), batch_size=config.train.per_device_eval_batch_size,
                      collate_fn=PairCollator(PadCollator(tokenizer.pad_token_id)))


def _constrained_choice(model, tokenizer, prompts, references, locations, config: Config, desc: str
                        ) -> dict[str, Any]:
    """The most likely of eval.choices for each prompt, and the confusion matrix against the references."""
    choices = config.eval.choices
    for reference, (path, record) in zip(references, locations):
        if reference.strip() not in choices:
            raise DataError(f"the reply '{reference}' is not one of eval.choices ({', '.join(choices)})",
                            path=path, record=record)
    scores = choice_loglikelihoods(model, tokenizer, prompts, choices, config.eval.batch_size,
                                   config.data.max_length, desc=f"scoring choices ({desc})")
    chosen = choose(scores, choices)
    matrix = confusion_matrix([reference.strip() for reference in references], chosen, choices)
    return {"choice_predictions": chosen, "confusion_matrix": matrix}


def compare_run(run_dir: str | Path, config: Config | None = None, write: bool = True) -> dict[str, Any]:
    """Evaluate the run's base model and the run's result (adapter or full model) on the run's eval split."""
    run = RunFolder(run_dir)
    config = config or run.config()
    run.check_trained()
    tokenizer = load_tokenizer(str(run.path))  # carries the chat template the run trained with
    _, eval_set, data_stats = build_datasets(config.data, tokenizer, config.stage, config.train.seed)
    if eval_set is None or len(eval_set) == 0:
        raise DataError("no evaluation data: set data.eval or data.val_size in the config")
    # Before loading the model, so bad benchmark files fail fast. The task files stay in the run folder:
    # `lm_eval --include_path RUN/benchmark_tasks` reruns them.
    suite = BenchmarkSuite(config.eval.benchmarks, run.path / "benchmark_tasks") if config.eval.benchmarks else None
    database = SqlDatabase(config.eval.sql_database, config.eval.sql_timeout) if config.eval.sql_database else None

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = (_compare_reward_models(config, run, eval_set, tokenizer, device, data_stats) if config.stage == "rm"
              else _compare_models(config, run, eval_set, tokenizer, device, data_stats, suite, database))
    if write:
        write_report(run, report)
    return report


def _compare_models(config: Config, run: RunFolder, eval_set, tokenizer, device: str, data_stats: dict[str, Any],
                    suite: BenchmarkSuite | None, database: SqlDatabase | None) -> dict[str, Any]:
    base, _, base_path = load_model(config.model)
    base.to(device)
    if run.holds_adapter:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, str(run.path))
        with tuned.disable_adapter():
            base_result = evaluate_model(tuned, tokenizer, eval_set, config, "base", suite, database)
        tuned_result = evaluate_model(tuned, tokenizer, eval_set, config, "tuned", suite, database)
    else:
        base_result = evaluate_model(base, tokenizer, eval_set, config, "base", suite, database)
        del base
        gc.collect()
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(run.path, dtype=pick_dtype(config.model.dtype)).to(device)
        tuned_result = evaluate_model(tuned, tokenizer, eval_set, config, "tuned", suite, database)
    if database is not None:
        database.close()

    return build_report(config, base_path, run, base_result, tuned_result, len(eval_set), data_stats)


def _compare_reward_models(config: Config, run: RunFolder, eval_set, tokenizer, device: str,
                           data_stats: dict[str, Any]) -> dict[str, Any]:
    """Stage rm: the reward model before training (the base with the run's seeded new head) and after, ranking the
    held-out pairs."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForSequenceClassification

    loader = pair_loader(eval_set, tokenizer, config)
    set_seed(config.train.seed)  # the head the run started from
    base, _, base_path = load_model(config.model, reward_head=True)
    started = time.time()
    base_result = {"metrics": reward_model_metrics(base.to(device), loader),
                   "seconds": {"pairs": time.time() - started}}
    del base
    gc.collect()
    tuned = AutoModelForSequenceClassification.from_pretrained(run.path, dtype=pick_dtype(config.model.dtype))
    started = time.time()
    tuned_result = {"metrics": reward_model_metrics(tuned.to(device), loader),
                    "seconds": {"pairs": time.time() - started}}
    return build_report(config, base_path, run, base_result, tuned_result, len(eval_set), data_stats)


def eval_data_summary(config: Config, data_stats: dict[str, Any]) -> dict[str, Any]:
    """What of the eval data was scored: examples dropped by truncation, the share each eval source kept (its
    weight), and the number of references per example."""
    summary = data_stats.get("eval") or {}
    eval_paths = {source.path for source in config.data.eval}
    return {
        "examples_in": summary.get("examples_in"), "dropped": summary.get("dropped", {}),
        "max_length": config.data.max_length,
        "subsets": [{"path": source["path"], "weight": source["weight"], "records": source["records"],
                     "used": source["examples_used"]}
                    for source in data_stats.get("sources", []) if source["path"] in eval_paths
                    and source["weight"] < 1],
        "references_per_example": round(max((source["notes"].get("references", 0) / max(1, source["records"])
                                             for source in data_stats.get("sources", [])
                                             if source["path"] in eval_paths), default=0), 2),
    }


def build_report(config: Config, base_path: str, run: RunFolder, base: dict[str, Any], tuned: dict[str, Any],
                 eval_examples: int, data_stats: dict[str, Any] | None = None) -> dict[str, Any]:
    metrics = {}
    for name, base_value in base["metrics"].items():
        tuned_value = tuned["metrics"][name]
        metrics[name] = {"base": base_value, "tuned": tuned_value, "delta": tuned_value - base_value}
    samples = []
    for index in range(len(tuned.get("prompts", []))):
        sample = {"prompt": tuned["prompts"][index][-1]["content"], "reference": tuned["references"][index]}
        if "predictions" in tuned:
            sample.update(base=base["predictions"][index], tuned=tuned["predictions"][index])
        if "choice_predictions" in tuned:
            sample.update(base_choice=base["choice_predictions"][index],
                          tuned_choice=tuned["choice_predictions"][index])
        samples.append(sample)
    choices = None
    if config.eval.choices:
        choices = {"labels": config.eval.choices, "base": base["confusion_matrix"],
                   "tuned": tuned["confusion_matrix"]}
    preference = None
    if "pair_logps" in tuned and config.stage in PREFERENCE_STAGES:
        preference = {"beta": config.pref.beta, **implicit_rewards(base["pair_logps"], tuned["pair_logps"],
                                                                   config.pref.beta)}
    return {
        "run": str(run.path), "base_model": config.model.name_or_path, "base_model_path": base_path,
        "stage": config.stage, "preference": preference,
        "method": config.method, "eval_examples": eval_examples,
        "eval_data": eval_data_summary(config, data_stats or {}),
        "generation_examples": len(samples) if "predictions" in tuned else 0, "extractor": config.eval.extractor,
        "choice_examples": len(samples) if choices else 0, "choices": choices,
        "tool_points": tuned.get("tool_points"), "loss_tokens": config.data.train_on,
        "metrics": metrics, "seconds": {"base": base["seconds"], "tuned": tuned["seconds"]},
        "samples": samples, "num_samples_shown": config.eval.num_samples, "training_log": run.metrics(),
        "benchmarks": _benchmark_details(config.eval, base, tuned),
    }


def _benchmark_details(settings: EvalConfig, base: dict[str, Any], tuned: dict[str, Any] | None
                       ) -> list[dict[str, Any]]:
    """How each benchmark was run, and its per-subject scores for both models (the base alone without `tuned`)."""
    details = []
    for benchmark in settings.benchmarks:
        base_run = base["benchmarks"][benchmark.metric_prefix]
        tuned_run = tuned["benchmarks"][benchmark.metric_prefix] if tuned is not None else None
        details.append({
            "name": benchmark.metric_prefix, "task": benchmark.task, "path": benchmark.path,
            "num_fewshot": benchmark.num_fewshot, "limit": benchmark.limit, "questions": base_run["questions"],
            "subjects": {subject: {"base": scores} | ({"tuned": tuned_run["subjects"][subject]} if tuned_run else {})
                         for subject, scores in base_run["subjects"].items()},
        })
    return details


def benchmark_models(model: ModelConfig, adapter: str | None, settings: EvalConfig, output: Path | None = None
                     ) -> dict[str, Any]:
    """eval.benchmarks on a model without a run folder: the model alone, or the model (base) vs the model with
    `adapter` (tuned). With `output`, the report (report.json, report.md, metrics.png) and the lm-eval task folder
    are written there."""
    if not settings.benchmarks:
        raise ConfigError("nothing to evaluate: name benchmarks (--benchmark TASK or TASK=PATH, or eval.benchmarks "
                          "in --config)")
    tasks = output / "benchmark_tasks" if output else Path(tempfile.mkdtemp(prefix="weitiao-benchmarks-"))
    suite = BenchmarkSuite(settings.benchmarks, tasks)
    adapter_run = RunFolder.adapter(adapter) if adapter else None
    base, tokenizer, base_path = load_model(model)
    base.to("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {}
    if adapter_run is not None:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, str(adapter_run.path))
        with tuned.disable_adapter():
            results["base"] = suite.evaluate(tuned, tokenizer, settings.batch_size)
        results["tuned"] = suite.evaluate(tuned, tokenizer, settings.batch_size)
    else:
        results["base"] = suite.evaluate(base, tokenizer, settings.batch_size)
    metrics = {}
    for name, value in results["base"]["metrics"].items():
        metrics[name] = {"base": value}
        if "tuned" in results:
            tuned_value = results["tuned"]["metrics"][name]
            metrics[name].update(tuned=tuned_value, delta=tuned_value - value)
    report = {"run": str(adapter_run.path) if adapter_run else None, "base_model": model.name_or_path,
              "base_model_path": base_path, "adapter": adapter, "method": None, "eval_examples": 0,
              "generation_examples": 0, "extractor": None, "choice_examples": 0, "choices": None,
              "metrics": metrics, "samples": [], "training_log": [],
              "benchmarks": _benchmark_details(settings, results["base"], results.get("tuned"))}
    if output is not None:
        write_report(RunFolder(output), report)
    return report
