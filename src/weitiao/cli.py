"""The `weitiao` command. Each subcommand is a thin shell over the Python API.

User errors (bad config, bad data, missing model) print one line and exit with status 2; a traceback
means a bug in weitiao.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from weitiao.errors import WeitiaoError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _columns(items: list[str] | None) -> dict[str, str]:
    mapping = {}
    for item in items or []:
        field, sep, column = item.partition("=")
        if not sep:
            raise WeitiaoError(f"--column expects FIELD=COLUMN (e.g. prompt=dialogue), got '{item}'")
        mapping[field] = column
    return mapping


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.config import load_config
    from weitiao.eval.compare import compare_run
    from weitiao.eval.report import format_table
    from weitiao.train.sft import run

    config = load_config(args.config, overrides)
    try:
        result = run(config, resume=args.resume)
    except KeyboardInterrupt:
        raise WeitiaoError("interrupted; continue from the last checkpoint with: weitiao train "
                           f"{args.config} --resume") from None
    if config.eval.compare and result.eval_loss is not None and int(os.environ.get("RANK", "0")) == 0:
        print("\nComparing the base model and the fine-tuned model on the eval split...")
        report = compare_run(result.output_dir, config)
        print("\n" + format_table(report))
        print(f"\nReport: {Path(result.output_dir) / 'report.md'}")


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.demo import run_demo

    run_demo(overrides)


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.config import load_config
    from weitiao.eval.compare import compare_run
    from weitiao.eval.report import format_samples, format_table

    run_dir = Path(args.run)
    config = load_config(args.config or run_dir / "config.yaml", overrides)
    report = compare_run(run_dir, config)
    print(format_table(report) + "\n\n" + format_samples(report))
    print(f"\nReport: {run_dir / 'report.md'}")


def _source_from_args(args: argparse.Namespace):
    from weitiao.config import DataSource

    return DataSource(path=args.file, format=args.format, columns=_columns(args.column),
                      prompt_template=args.prompt_template)


def cmd_data_inspect(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.config import DataConfig
    from weitiao.data.inspect import inspect
    from weitiao.models import load_tokenizer, resolve_model

    data = DataConfig(template=args.template, max_length=args.max_length, truncation=args.truncation,
                      train_on=args.train_on, cache=False)
    tokenizer = load_tokenizer(resolve_model(args.model))
    print(inspect(_source_from_args(args), tokenizer, data, example_index=args.example))


def cmd_data_convert(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.data.inspect import convert

    counts = convert(_source_from_args(args), args.to, Path(args.output), on_error=args.on_error)
    print(f"read {counts['read']} records, wrote {counts['written']} to {args.output} ({args.to})"
          + (f", skipped {counts['skipped']}" if counts["skipped"] else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weitiao", description="Fine-tune an open LLM on your data, prove it "
                                     "got better, and serve it.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune from a YAML config",
                                description="Fine-tune from a YAML config. Any config key can be overridden: "
                                "--train.learning_rate 1e-4, --learning_rate=1e-4 (unique leaf names), --model PATH.")
    train.add_argument("config", help="YAML config file (see docs/config.md and examples/)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    train.set_defaults(handler=cmd_train)

    demo = commands.add_parser("demo", help="fine-tune the default model on the demo data and show the gain")
    demo.set_defaults(handler=cmd_demo)

    evaluate = commands.add_parser("eval", help="compare base and fine-tuned model of a run; writes report.md")
    evaluate.add_argument("run", help="a training output folder")
    evaluate.add_argument("--config", help="config to evaluate with (default: the run's config.yaml)")
    evaluate.add_argument("--compare", action="store_true", help="base vs tuned side by side (the default)")
    evaluate.set_defaults(handler=cmd_eval)

    data = commands.add_parser("data", help="inspect and convert datasets").add_subparsers(dest="data_command",
                                                                                           required=True)
    for name, handler, help_text in (("inspect", cmd_data_inspect, "format, counts, token lengths, truncation and "
                                      "a rendered example with the trained tokens marked"),
                                     ("convert", cmd_data_convert, "rewrite a dataset in another format")):
        sub = data.add_parser(name, help=help_text)
        sub.add_argument("file", help="a json/jsonl/csv/parquet file, a folder or a glob")
        sub.add_argument("--format", default="auto", help="input format (default: detected)")
        sub.add_argument("--column", action="append", metavar="FIELD=COLUMN",
                         help="map a format field to a column, e.g. --column prompt=dialogue")
        sub.add_argument("--prompt-template", help="format string over the columns that builds the user turn")
        sub.set_defaults(handler=handler)
        if name == "inspect":
            sub.add_argument("--model", default="default", help="whose tokenizer counts tokens (default model)")
            sub.add_argument("--max-length", type=int, default=1024)
            sub.add_argument("--truncation", default="right", choices=["right", "left", "drop"])
            sub.add_argument("--template", default="auto")
            sub.add_argument("--train-on", default="responses", choices=["responses", "all"])
            sub.add_argument("--example", type=int, default=0, help="which example to render (0-based)")
        else:
            sub.add_argument("--to", required=True, choices=["alpaca", "sharegpt", "openai", "qa", "text"])
            sub.add_argument("output", help="output file; its suffix picks jsonl/json/csv/parquet")
            sub.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "demo", "eval"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _quiet_libraries()
        args.handler(args, extra)
    except WeitiaoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
