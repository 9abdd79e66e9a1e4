"""The `weitiao` command. Each subcommand is a thin shell over the Python API.

User errors (bad config, bad data, missing model) print one line and exit with status 2; a traceback
means a bug in weitiao.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import typing
from pathlib import Path

from weitiao.errors import WeitiaoError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _columns(items: list[str] | None) -> dict[str, str | list[str]]:
    """--column FIELD=COLUMN, or FIELD=COLUMN1,COLUMN2 for a reply with several references."""
    mapping: dict[str, str | list[str]] = {}
    for item in items or []:
        field, sep, column = item.partition("=")
        if not sep:
            raise WeitiaoError(f"--column expects FIELD=COLUMN (e.g. prompt=dialogue), got '{item}'")
        mapping[field] = column.split(",") if "," in column else column
    return mapping


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.config import load_config
    from weitiao.eval.compare import compare_run
    from weitiao.eval.report import format_table
    from weitiao.runs import RunFolder
    from weitiao.train import run

    config = load_config(args.config, overrides)  # validate here, before any process starts
    if args.gpus:
        from weitiao.train.distributed import launch, launch_command

        sys.exit(launch(launch_command(args.config, overrides, args.gpus, args.nnodes, args.node_rank,
                                       args.master_addr, args.master_port, resume=args.resume)))
    try:
        result = run(config, resume=args.resume)
    except KeyboardInterrupt:
        raise WeitiaoError("interrupted; continue from the last checkpoint with: weitiao train "
                           f"{args.config} --resume") from None
    if config.eval.compare and result.eval_loss is not None and int(os.environ.get("RANK", "0")) == 0:
        print("\nComparing the base model and the fine-tuned model on the eval split...")
        report = compare_run(result.output_dir, config)
        print("\n" + format_table(report))
        print(f"\nReport: {Path(result.output_dir) / RunFolder.REPORT_MARKDOWN}")


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.demo import run_demo

    run_demo(overrides)


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.config import load_config
    from weitiao.eval.compare import compare_run
    from weitiao.eval.report import format_samples, format_table
    from weitiao.runs import RunFolder

    if args.run is None:
        if not (args.benchmark or args.config):
            raise WeitiaoError("weitiao eval needs a run folder (weitiao eval RUN) or benchmarks to score a model on "
                               "(weitiao eval --model MODEL --benchmark TASK[=PATH])")
        _eval_benchmarks(args, overrides)
        return
    if args.benchmark or args.model or args.adapter:
        raise WeitiaoError("--model, --adapter and --benchmark are for evaluating without a run folder; a run is "
                           "evaluated as its config says (--config, or overrides such as eval.max_examples=50)")
    run = RunFolder(args.run)
    config = load_config(args.config, overrides) if args.config else run.config(overrides)
    report = compare_run(run.path, config)
    print(format_table(report) + "\n\n" + format_samples(report))
    print(f"\nReport: {run.path / RunFolder.REPORT_MARKDOWN}")


def _eval_benchmarks(args: argparse.Namespace, overrides: list[str]) -> None:
    """weitiao eval --model M [--adapter A] --benchmark TASK[=PATH] ...: benchmarks without a run folder."""
    from weitiao.config import BenchmarkConfig, load_config, section_from_dict
    from weitiao.eval.compare import benchmark_models
    from weitiao.eval.report import format_table
    from weitiao.runs import RunFolder

    config = load_config(args.config, overrides)
    model = config.model if args.model is None else config.model.model_copy(update={"name_or_path": args.model})
    benchmarks = list(config.eval.benchmarks)
    for item in args.benchmark or []:
        task, _, path = item.partition("=")
        options = {"task": task, "path": path or None, "limit": args.limit, "num_fewshot": args.num_fewshot,
                   "subjects": args.subjects.split(",") if args.subjects else None}
        benchmarks.append(section_from_dict(BenchmarkConfig, {k: v for k, v in options.items() if v is not None},
                                            f"--benchmark {item}"))
    settings = config.eval.model_copy(update={"benchmarks": benchmarks})
    output = Path(args.output) if args.output else None
    report = benchmark_models(model, args.adapter, settings, output)
    print(format_table(report))
    if output is not None:
        print(f"\nReport: {output / RunFolder.REPORT_MARKDOWN}")


def _source_from_args(args: argparse.Namespace):
    from weitiao.config import DataSource, section_from_dict

    return section_from_dict(DataSource, {
        "path": args.file, "format": args.format, "columns": _columns(args.column),
        "prompt_template": args.prompt_template, "encoding": args.encoding, "label": args.label,
        "dataset": args.dataset}, "(options)")


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


def _section_options(parser: argparse.ArgumentParser, section) -> None:
    """One --option per field of a config section, documented by the field's docstring (as in docs/config.md)."""
    for name, field in section.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default()
        help_text = " ".join((field.description or "").split()).replace("%", "%%")
        if default is not None:
            help_text += f" (default: {default!r})".replace("%", "%%")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        # Values stay text: the section's own validation converts and checks them, with the config's error messages.
        parser.add_argument(flag, default=argparse.SUPPRESS, choices=choices, metavar=None if choices else "VALUE",
                            help=help_text)


def _section_from_args(section, args: argparse.Namespace):
    from weitiao.config import section_from_dict

    given = {name: getattr(args, name) for name in section.model_fields if hasattr(args, name)}
    return section_from_dict(section, given, "(options)")


def cmd_data_clean(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.config import CleanConfig
    from weitiao.data.clean import clean_examples, format_clean_summary, write_clean
    from weitiao.data.readers import check_output

    config = _section_from_args(CleanConfig, args)
    source = _source_from_args(args)
    output = check_output(Path(args.output), source.path)
    result = clean_examples(source, config)
    print(format_clean_summary(write_clean(result, output, source.path)))


def cmd_data_select(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.config import SelectConfig
    from weitiao.data.readers import check_output
    from weitiao.data.dataset import load_source
    from weitiao.data.select import format_summary, select_examples, write_selection

    config = _section_from_args(SelectConfig, args)
    source = _source_from_args(args)
    output = check_output(Path(args.output), source.path)
    examples, stats = load_source(source, args.on_error)
    if config.report:
        from weitiao.eval.selection import format_report, report_selection
        from weitiao.train import run

        report = report_selection(examples, source, config, output, train=run, skipped=stats.skipped)
        print(format_report(report))
        return
    selection = select_examples(examples, config)
    print(format_summary(write_selection(examples, selection, output, config, source, stats.skipped)))


def cmd_merge(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.serve.merge import merge_adapter

    out = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(f"merged model saved to {out} (loads with AutoModelForCausalLM.from_pretrained)")


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> None:
    import shlex

    from weitiao.serve.export import check_export, export_run

    run = Path(args.run)
    stem = run.resolve().name  # a folder per export: a GGUF file's Modelfile sits beside it
    out = args.out or (run.parent / f"{stem}-{args.quant}" / f"{stem}-{args.quant}.gguf" if args.to == "gguf"
                       else run.parent / f"{stem}-{args.to}")
    export = export_run(run, args.to, out, quant=args.quant, adapter=args.adapter, name=args.name)
    print(f"exported {args.to}: {export.path}" + "".join(f"\n  {path}" for path in export.files))
    if export.command:
        print("serve it with:\n  " + shlex.join(export.command))
    if args.check:
        checked = check_export(export, run, args.check_examples)
        print(f"chat template kept: {'yes' if checked['chat_template_kept'] else 'NO'}; end-of-reply ids "
              f"{checked['eos_token_ids']} (the run's: {checked['expected_eos_token_id']})")
        print(f"{'metric':<24}{'run':>12}{'exported':>12}")
        for metric, values in checked["metrics"].items():
            run_value = "-" if values["run"] is None else f"{values['run']:.4f}"
            print(f"{metric:<24}{run_value:>12}{values['exported']:>12.4f}")


def cmd_vocab_extend(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.vocab import extend_vocabulary

    extend_vocabulary(args.model, args.corpus, args.out, count=args.add, min_frequency=args.min_frequency,
                      held_out=args.held_out, eval_corpus=args.eval, sentencepiece_vocab=args.sp_vocab_size,
                      sample_by=args.sample_by)
    print(f"saved to {args.out} (AutoModelForCausalLM / AutoTokenizer load it; train it with method full, or lora "
          "with lora.modules_to_save: [embed_tokens, lm_head])")


def _engine(args: argparse.Namespace, adapters: dict[str, str]):
    from weitiao.generation.engine import Engine

    print(f"loading {args.model}...", file=sys.stderr)
    sizes = {key: getattr(args, key) for key in ("max_batch", "max_model_len", "max_queue")
             if getattr(args, key, None) is not None}
    return Engine.from_model_arg(args.model, adapters, dtype=args.dtype, base_name=getattr(args, "name", None),
                                 threads=args.threads, **sizes)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the first line of --api-key-file, else $WEITIAO_API_KEY (the file and the variable keep the
    key out of `ps`)."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip().splitlines()
        except OSError as error:
            raise WeitiaoError(f"cannot read --api-key-file {args.api_key_file}: {error.strerror}") from None
        if not key or not key[0].strip():
            raise WeitiaoError(f"--api-key-file {args.api_key_file} is empty")
        return key[0].strip()
    return args.api_key or os.environ.get("WEITIAO_API_KEY") or None


def _check_exposure(args: argparse.Namespace, protected: bool) -> None:
    """A server reachable from other machines needs a key (the API) or an explicit --insecure."""
    if _is_loopback(args.host) or protected or args.insecure:
        return
    what = ("set an API key (--api-key-file FILE or $WEITIAO_API_KEY)" if args.command == "serve"
            else "the web UI has no login and its Train tab runs jobs on this machine")
    raise WeitiaoError(f"--host {args.host} makes the {args.command} reachable from other machines: {what}; "
                       "add --insecure to do it anyway")


def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.serve.chat import chat_loop
    from weitiao.runs import RunFolder
    from weitiao.generation.requests import SamplingParams

    adapters = {}
    if args.adapter:
        adapters[RunFolder.adapter(args.adapter).path.resolve().name] = args.adapter
    engine = _engine(args, adapters)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            stop=args.stop or [], seed=args.seed)
    model = next(iter(adapters), engine.default_model)
    chat_loop(engine, model, params, system=args.system)
    engine.close()


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.generation.engine import parse_adapter_specs
    from weitiao.serve.server import bind_socket, run_server

    from weitiao.serve.server import ServerLimits, default_allowed_hosts

    adapters = parse_adapter_specs(args.adapter)
    api_key = _api_key(args)
    _check_exposure(args, protected=api_key is not None)
    limits = ServerLimits(allowed_hosts=_allowed_hosts(args, default_allowed_hosts(args.host)),
                          request_timeout=args.request_timeout)
    with bind_socket(args.host, args.port) as sock:  # before loading the model: a taken port fails at once
        engine = _engine(args, adapters)
        run_server(engine, sock, api_key=api_key, limits=limits)
        engine.close()


def _allowed_hosts(args: argparse.Namespace, default: list[str] | None) -> list[str] | None:
    if "*" in (args.allowed_host or []):
        return None
    return sorted(set(default or []) | set(args.allowed_host)) if args.allowed_host else default


def cmd_webui(args: argparse.Namespace, overrides: list[str]) -> None:
    from weitiao.generation.engine import parse_adapter_specs
    from weitiao.serve.server import bind_socket
    from weitiao.serve.webui import launch

    from weitiao.serve.server import default_allowed_hosts

    adapters = parse_adapter_specs(args.adapter)
    _check_exposure(args, protected=False)
    bind_socket(args.host, args.port).close()  # fail now, not after loading the model, when the port is taken
    engine = _engine(args, adapters)
    launch(engine, host=args.host, port=args.port, runs_dir=args.runs_dir,
           allowed_hosts=_allowed_hosts(args, default_allowed_hosts(args.host)))
    engine.close()


def _add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    parser.add_argument("model", nargs=None if model_required else "?", default="default",
                        help="'default', a model folder (a weitiao run with a full model too), a .gguf file, a hub "
                        "id, or an adapter run folder (its base is loaded and the adapter attached)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights dtype (auto: bf16 on a GPU that has it, fp32 on the CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads for generation (default: measured at load: 1, half "
                        "or all cores, whichever decodes fastest right now; or OMP_NUM_THREADS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weitiao", description="Fine-tune an open LLM on your data, prove it "
                                     "got better, and serve it.")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_train_commands(commands)
    _add_eval_command(commands)
    _add_model_commands(commands)
    _add_server_commands(commands)
    _add_vocab_commands(commands)
    _add_data_commands(commands)
    return parser


def _add_train_commands(commands) -> None:
    """Train and demo."""
    train = commands.add_parser("train", help="fine-tune from a YAML config",
                                description="Fine-tune from a YAML config. Any config key can be overridden: "
                                "--train.learning_rate 1e-4, --learning_rate=1e-4 (unique leaf names), --model PATH.")
    train.add_argument("config", help="YAML config file (see docs/config.md and examples/)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    launcher = train.add_argument_group("several GPUs and nodes (torchrun; see docs/distributed.md)")
    launcher.add_argument("--gpus", type=int, help="processes on this node, one per GPU (CPU processes where "
                          "there is no GPU); the engine is train.distributed")
    launcher.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    launcher.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0 .. nnodes-1")
    launcher.add_argument("--master-addr", default="127.0.0.1", help="address of the node with rank 0")
    launcher.add_argument("--master-port", type=int, default=29500)
    train.set_defaults(handler=cmd_train)

    demo = commands.add_parser("demo", help="fine-tune the default model on the demo data and show the gain")
    demo.set_defaults(handler=cmd_demo)


def _add_eval_command(commands) -> None:
    """Eval: a run's comparison, or benchmarks without a run."""
    evaluate = commands.add_parser("eval", help="compare base and fine-tuned model of a run (writes report.md), or "
                                   "score any model on benchmarks without a run")
    evaluate.add_argument("run", nargs="?", help="a training output folder (leave out with --model/--benchmark)")
    evaluate.add_argument("--config", help="config to evaluate with (default: the run's config.yaml)")
    evaluate.add_argument("--compare", action="store_true", help="base vs tuned side by side (the default)")
    evaluate.add_argument("--model", help="without a run: the model to score (default: model.name_or_path of "
                          "--config, else the default model)")
    evaluate.add_argument("--adapter", help="without a run: score the model with this adapter too (base vs tuned)")
    evaluate.add_argument("--benchmark", action="append", metavar="TASK[=PATH]",
                          help="without a run: an lm-eval task, or a local one: mmlu|ceval|cmmlu=FOLDER, "
                          "truthfulqa_mc1|truthfulqa_mc2=mc_task.json, blimp=FOLDER of <phenomenon>.jsonl (repeatable)")
    evaluate.add_argument("--subjects", help="comma-separated subjects (mmlu/ceval/cmmlu) or phenomena (blimp)")
    evaluate.add_argument("--limit", type=int, help="score only the first N questions of each subject")
    evaluate.add_argument("--num-fewshot", type=int, help="solved examples before each question")
    evaluate.add_argument("--output", help="without a run: folder for report.json / report.md (default: print only)")
    evaluate.set_defaults(handler=cmd_eval)


def _add_model_commands(commands) -> None:
    """Merge and chat."""
    merge = commands.add_parser("merge", help="fold a LoRA adapter into its base model (a plain transformers folder)")
    merge.add_argument("--adapter", required=True, help="adapter folder (a weitiao LoRA run)")
    merge.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    merge.add_argument("--out", required=True, help="new folder for the merged model")
    merge.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="dtype of the saved weights (the merge itself is computed in fp32)")
    merge.set_defaults(handler=cmd_merge)

    from weitiao.serve.export import GGUF_QUANTS, TARGETS  # light: no torch work at import

    export = commands.add_parser("export", help="a trained run as a GGUF file (llama.cpp, Ollama), a model folder "
                                                "with a model card, or a folder and command for vLLM / SGLang")
    export.add_argument("run", help="a weitiao run folder (LoRA adapter or full model)")
    export.add_argument("--to", required=True, choices=TARGETS)
    export.add_argument("--out", help="a new .gguf file (gguf) or folder; default: beside the run")
    export.add_argument("--quant", default="f16", choices=GGUF_QUANTS,
                        help="GGUF type of the weight matrices (K-quants such as q4_k_m: export f16, then run "
                             "llama.cpp's llama-quantize on it)")
    export.add_argument("--adapter", action="store_true",
                        help="vllm/sglang: serve base + LoRA adapter unmerged (several adapters share one base)")
    export.add_argument("--name", help="model name in the file / served model name (default: the run folder's)")
    export.add_argument("--check", action="store_true",
                        help="load the export as its server would and run the run's evaluation on it")
    export.add_argument("--check-examples", type=int, help="--check: generation examples (default: eval.max_examples)")
    export.set_defaults(handler=cmd_export)

    chat = commands.add_parser("chat", help="talk to a model in the terminal")
    _add_model_arguments(chat)
    chat.add_argument("--adapter", help="adapter folder to talk to (on top of MODEL)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-tokens", type=int, help="longest reply in tokens (default 512, at most half the "
                      "context window)")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding (default 0.7)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    chat.add_argument("--seed", type=int, help="seed for reproducible sampling")
    chat.add_argument("--stop", action="append", metavar="TEXT", help="end a reply at TEXT (repeatable)")
    chat.set_defaults(handler=cmd_chat)


def _add_server_commands(commands) -> None:
    """Serve and webui, which share their model and network options."""
    for name, handler, port, help_text in (
            ("serve", cmd_serve, 8000, "an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)"),
            ("webui", cmd_webui, 7860, "a web UI to chat, train and read evaluation reports")):
        sub = commands.add_parser(name, help=help_text)
        _add_model_arguments(sub, model_required=name == "serve")
        sub.add_argument("--adapter", action="append", metavar="NAME=PATH",
                         help="attach an adapter (run folder) under NAME; repeatable")
        sub.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
        sub.add_argument("--port", type=int, default=port, help=f"port (default {port})")
        sub.add_argument("--insecure", action="store_true", help="allow a --host other machines reach without "
                         + ("an API key" if name == "serve" else "a login"))
        sub.add_argument("--allowed-host", action="append", metavar="NAME",
                         help="a Host header to answer besides localhost and --host (repeatable; '*': any). Others "
                         "get a 400, which stops DNS-rebinding pages from reaching a local server")
        sub.add_argument("--max-batch", type=int, help="replies decoded at once (default 64 on a GPU, 8 on a CPU)")
        sub.add_argument("--max-model-len", type=int, help="longest prompt + reply in tokens (default: the model's "
                         "context, at most 4096)")
        if name == "serve":
            sub.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $WEITIAO_API_KEY; "
                             "a key given here shows in `ps`, prefer --api-key-file)")
            sub.add_argument("--api-key-file", help="read the API key from the first line of this file")
            sub.add_argument("--max-queue", type=int, help="requests (prompts) waiting for a row before the server "
                             "answers 503 (default 256)")
            sub.add_argument("--request-timeout", type=float, default=20, help="seconds a connection may stay open "
                             "without sending a request (default 20)")
            sub.add_argument("--name", help="the base model's name in the API (default: MODEL as given)")
        else:
            sub.add_argument("--runs-dir", default="outputs", help="where the Train tab writes runs and the Eval tab "
                             "looks for them (default outputs)")
        sub.set_defaults(handler=handler)


def _add_vocab_commands(commands) -> None:
    """Vocab extend."""
    vocab = commands.add_parser("vocab", help="extend a tokenizer with a domain's words").add_subparsers(
        dest="vocab_command", required=True)
    extend = vocab.add_parser("extend", help="add a corpus's frequent SentencePiece pieces to the tokenizer and "
                              "resize the model (new rows: the mean of the old tokens that spelled each piece)")
    extend.add_argument("--model", default="default", help="base model (default: the default model)")
    extend.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                        help="domain text: txt/jsonl/json/csv/tsv/parquet files, folders or globs")
    extend.add_argument("--add", type=int, default=2000, help="new tokens, at most (default 2000)")
    extend.add_argument("--min-frequency", type=int, default=5, help="least occurrences of a piece in the corpus "
                        "(default 5)")
    extend.add_argument("--held-out", type=float, default=0.05, help="share of the documents kept out of training "
                        "to measure tokens per character on, without --eval (default 0.05)")
    extend.add_argument("--eval", nargs="+", metavar="PATH", help="held-out domain text to measure tokens per "
                        "character on (then the whole corpus is learned from)")
    extend.add_argument("--sp-vocab-size", type=int, default=16000, help="pieces of the SentencePiece model the "
                        "candidates come from (default 16000)")
    extend.add_argument("--sample-by", default="paragraph", choices=["line", "paragraph", "document"],
                        help="documents of .txt files (default paragraph)")
    extend.add_argument("--out", required=True, help="new folder for the extended model and tokenizer")
    extend.set_defaults(handler=cmd_vocab_extend)


def _add_data_commands(commands) -> None:
    """Data inspect, convert, clean, select: one data source each."""
    data = commands.add_parser("data", help="inspect, convert, clean and select datasets").add_subparsers(
        dest="data_command", required=True)
    for name, handler, help_text in (
            ("inspect", cmd_data_inspect, "format, counts, token lengths, truncation and a rendered example with the "
             "trained tokens marked"),
            ("convert", cmd_data_convert, "rewrite a dataset in another format"),
            ("clean", cmd_data_clean, "remove broken, empty, cut-off, off-language and duplicate records; removed "
             "ones go to OUT.removed.jsonl"),
            ("select", cmd_data_select, "keep the examples worth training on (IFD, k-center, quality, perplexity, "
             "random) at a ratio or count; see docs/data-selection.md")):
        sub = data.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("file", help="a json/jsonl/csv/tsv/parquet file, a folder or a glob; with --dataset, "
                         "LLaMA-Factory's dataset_info.json or its folder")
        sub.add_argument("--dataset", help="a dataset named in that dataset_info.json (e.g. alpaca_zh_demo)")
        sub.add_argument("--format", default="auto", help="input format (default: detected)")
        sub.add_argument("--column", action="append", metavar="FIELD=COLUMN",
                         help="map a format field to a column, e.g. --column prompt=dialogue")
        sub.add_argument("--prompt-template", help="format string over the columns that builds the user turn")
        sub.add_argument("--encoding", help="text encoding of the files: e.g. gb18030, cp1252, utf-16, or auto "
                         "(default: UTF-8)")
        sub.add_argument("--label", help="read plain-text files as one example per line with this reply, e.g. "
                         "positive, or {file} for the label in the file name (reviews.pos -> pos)")
        sub.set_defaults(handler=handler)
        if name == "inspect":
            sub.add_argument("--model", default="default", help="whose tokenizer counts tokens (default model)")
            sub.add_argument("--max-length", type=int, default=1024)
            sub.add_argument("--truncation", default="right", choices=["right", "left", "drop"])
            sub.add_argument("--template", default="auto")
            sub.add_argument("--train-on", default="responses", choices=["responses", "all"])
            sub.add_argument("--example", type=int, default=0, help="which example to render (0-based)")
        elif name == "convert":
            sub.add_argument("--to", required=True, choices=["alpaca", "sharegpt", "openai", "qa", "text"])
            sub.add_argument("output", help="output file; its suffix picks jsonl/json/csv/tsv/parquet")
            sub.add_argument("--on-error", default="raise", choices=["raise", "skip"])
        else:
            from weitiao.config import CleanConfig, SelectConfig

            sub.add_argument("output", help="output file (the kept records, as they are in the input); its suffix "
                             "picks jsonl/json/csv/tsv/parquet. Side files OUT.*.json(l)/png go next to it")
            if name == "select":
                sub.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                                 help="records that cannot be read stop the command, or are skipped")
            _section_options(sub, CleanConfig if name == "clean" else SelectConfig)


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
    except BrokenPipeError:
        # The reader went away (`weitiao data inspect x | head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
