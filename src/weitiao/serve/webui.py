"""`weitiao webui`: a gradio app to chat with the base model and its adapters, train, and read reports.

- Chat: pick the base or an adapter and stream the reply; side by side sends one prompt to two models.
- Train: the main hyper-parameters become a weitiao config, run as `weitiao train CONFIG` in a subprocess
  (exactly the CLI run; Stop terminates it); its metrics.jsonl feeds a live loss plot.
- Eval: a run folder's report (report.json) with its plots.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls (often no network at all)

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from weitiao.config import config_from_dict, dump_config  # noqa: E402
from weitiao.errors import WeitiaoError  # noqa: E402
from weitiao.eval.report import plot_loss_curves, render_samples, render_summary  # noqa: E402
from weitiao.runs import RunFolder  # noqa: E402
from weitiao.generation.engine import Engine, check_adapter_name  # noqa: E402
from weitiao.generation.requests import Generation, SamplingParams  # noqa: E402

DEMO_DATA = Path(__file__).resolve().parents[1] / "demo"
TEMPLATES = ["auto", "alpaca", "qa", "dolly", "chatml"]
LOG_LINES = 15


# ---------------------------------------------------------------------------------------------
# Training runs: one `weitiao train` subprocess at a time.


def training_config(model: str, train_file: str, eval_file: str, val_size: float, template: str, method: str,
                    epochs: float, max_steps: int, learning_rate: float, batch_size: int, lora_r: int,
                    max_length: int, logging_steps: int, compare: bool, output_dir: str) -> dict[str, Any]:
    """The config the Train tab's fields describe (validated by weitiao's config model before use)."""
    data: dict[str, Any] = {"train": [train_file], "template": template, "max_length": int(max_length)}
    if eval_file.strip():
        data["eval"] = [eval_file.strip()]
    else:
        data["val_size"] = val_size
    return {"model": {"name_or_path": model}, "data": data, "method": method,
            "lora": {"r": int(lora_r), "alpha": 2 * int(lora_r)},
            "train": {"output_dir": output_dir, "num_train_epochs": epochs, "max_steps": int(max_steps),
                      "learning_rate": learning_rate, "per_device_train_batch_size": int(batch_size),
                      "logging_steps": int(logging_steps)},
            "eval": {"compare": compare}}


@dataclass
class TrainingRun:
    """A `weitiao train` subprocess and the files it writes."""
    output_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    finished: float | None = None
    stopped: bool = False

    @classmethod
    def start(cls, raw_config: dict[str, Any], workdir: Path) -> TrainingRun:
        for source in raw_config["data"]["train"] + raw_config["data"].get("eval", []):
            if not Path(source).exists():
                raise WeitiaoError(f"dataset file not found: {source}")
        config = config_from_dict(raw_config, "(web UI)")
        output_dir = Path(config.train.output_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        config_path = workdir / f"{output_dir.name}-{stamp}.yaml"
        config_path.write_text(dump_config(config), encoding="utf-8")
        log_path = config_path.with_suffix(".log")
        with log_path.open("w", encoding="utf-8") as log:
            process = subprocess.Popen([sys.executable, "-m", "weitiao", "train", str(config_path)], stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return cls(output_dir, config_path, log_path, process)

    @property
    def running(self) -> bool:
        if self.process.poll() is None:
            return True
        if self.finished is None:
            self.finished = time.time()
        return False

    def stop(self) -> None:
        if self.running:
            self.stopped = True
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def metrics(self) -> list[dict[str, Any]]:
        return RunFolder(self.output_dir).metrics()

    def log_tail(self) -> str:
        """The last lines of the run's output, with progress-bar redraws (carriage returns) collapsed."""
        if not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        lines = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
        return "\n".join(line for line in lines[-LOG_LINES:])

    def status(self) -> str:
        elapsed = (self.finished or time.time()) - self.started
        steps = [record["step"] for record in self.metrics() if "loss" in record]
        progress = f", step {steps[-1]}" if steps else ""
        if self.running:
            return f"**Running** `weitiao train {self.config_path}` → `{self.output_dir}` ({elapsed:.0f} s{progress})"
        if self.stopped:
            return f"**Stopped** after {elapsed:.0f} s{progress}."
        if self.process.returncode == 0:
            return (f"**Finished** in {elapsed:.0f} s{progress}: saved to `{self.output_dir}`. Attach it in the Chat "
                    "tab, or read its report in the Eval tab.")
        return f"**Failed** (exit status {self.process.returncode}); see the log below, all of it in `{self.log_path}`."


class Trainer:
    """The web UI's training slot: one run at a time, shared by every browser session."""

    def __init__(self, workdir: Path | None = None):
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="weitiao-webui-"))
        self.current: TrainingRun | None = None
        self._lock = threading.Lock()

    def start(self, raw_config: dict[str, Any]) -> TrainingRun:
        with self._lock:
            if self.current is not None and self.current.running:
                raise WeitiaoError("a run is in progress; stop it first")
            self.current = TrainingRun.start(raw_config, self.workdir)
            return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()


def loss_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Training and validation loss by step, in the long format LinePlot draws one line per series from.

    Both series are always present (an empty one as a single blank point): the plot fixes its colours and
    legend from the series in the first value it draws, which is the empty frame at page load."""
    rows = []
    for series, key in (("training", "loss"), ("validation", "eval_loss")):
        points = [{"step": r["step"], "loss": r[key], "series": series} for r in records if key in r]
        rows += points or [{"step": 0, "loss": float("nan"), "series": series}]
    # Explicit dtypes: the plot's axis kinds follow them, and an empty frame would otherwise be all 'object'.
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": int, "loss": float, "series": str})


# ---------------------------------------------------------------------------------------------
# Reports.


def run_output_dir(runs_dir: Path, name: str) -> Path:
    """Where the Train tab writes run `name`: a plain folder name directly under runs_dir, never a path."""
    return runs_dir / check_adapter_name(name.strip(), "run name")


def report_folder(runs_dir: Path, path: str) -> Path:
    """A run folder the Eval tab may show: one under runs_dir (the box takes typed paths too)."""
    folder = Path(path).expanduser()
    folder = (folder if folder.is_absolute() else Path.cwd() / folder).resolve()
    if not folder.is_relative_to(runs_dir.resolve()):
        raise WeitiaoError(f"`{path}` is not under the runs folder `{runs_dir}` (weitiao webui --runs-dir sets it)")
    return folder


def answered(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation without turns that were stopped before any reply came: a user message followed by an
    empty assistant message would be sent back to the model as if it had answered nothing."""
    kept: list[dict[str, str]] = []
    for message in conversation:
        if message["role"] == "assistant" and not message["content"].strip():
            if kept and kept[-1]["role"] == "user":
                kept.pop()
            continue
        kept.append(message)
    return kept


def list_runs(runs_dir: Path) -> list[str]:
    """Run folders under runs_dir (weitiao wrote them: a config or a metrics log), newest first."""
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and RunFolder(p).is_run]
    return [str(p) for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def load_report(path: str) -> tuple[str, Any, Any, str]:
    """A run folder's report.json for display: (summary and metric table, loss-curve image, metrics image,
    sample answers)."""
    from PIL import Image

    run = RunFolder(path or "")
    if not path or not run.path.is_dir():
        return f"No run folder at `{path}`." if path else "Pick a run folder.", None, None, ""
    images = [Image.open(run.path / name).copy() if (run.path / name).is_file() else None
              for name in (RunFolder.LOSS_PLOT, RunFolder.METRICS_PLOT)]
    report = run.report()
    if report is None:
        note = (f"`{run.path}` has no report yet: it is written after training when eval.compare is on, or by "
                f"`weitiao eval {run.path}`.")
        metrics = run.metrics()
        if images[0] is None and metrics:
            plot = Path(tempfile.mkdtemp(prefix="weitiao-webui-")) / RunFolder.LOSS_PLOT
            if plot_loss_curves(metrics, plot):
                images[0] = Image.open(plot).copy()
        return note, images[0], images[1], ""
    return render_summary(report), images[0], images[1], render_samples(report)


# ---------------------------------------------------------------------------------------------
# The app.


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def build_app(engine: Engine, runs_dir: str | Path = "outputs", trainer: Trainer | None = None) -> gr.Blocks:
    """The web UI: a Chat, a Train and an Eval tab over `engine`; training runs go under runs_dir."""
    runs_dir = Path(runs_dir)
    adapters = [name for name in engine.names if name != engine.base_name]
    with gr.Blocks(title="weitiao", analytics_enabled=False) as app:
        gr.Markdown(f"## weitiao · `{engine.base_name}`" + (f" + adapters: {', '.join(adapters)}" if adapters else ""))
        _chat_tab(app, engine)
        _train_tab(engine, runs_dir, trainer or Trainer())
        _eval_tab(app, runs_dir)
    return app


def _chat_tab(app: gr.Blocks, engine: Engine) -> None:
    """Chat with one model, or two side by side; attach adapters; Stop cancels this page's replies."""
    adapters = [name for name in engine.names if name != engine.base_name]
    second = engine.base_name if engine.default_model != engine.base_name else (adapters[0] if adapters
                                                                                  else engine.base_name)
    with gr.Tab("Chat"):
        with gr.Row():
            model_a = gr.Dropdown(engine.names, value=engine.default_model, label="Model", elem_id="model-a")
            side_by_side = gr.Checkbox(label="Side by side: send each prompt to a second model too",
                                       elem_id="side-by-side")
            model_b = gr.Dropdown(engine.names, value=second, label="Second model", visible=False,
                                  elem_id="model-b")
        with gr.Row():
            chat_a = gr.Chatbot(label=engine.default_model, elem_id="chat-a", height=420)
            chat_b = gr.Chatbot(label=second, elem_id="chat-b", height=420, visible=False)
        prompt = gr.Textbox(placeholder="Message (Enter sends)", show_label=False, elem_id="prompt",
                            submit_btn="Send")
        with gr.Row():
            stop_chat = gr.Button("Stop", elem_id="stop-chat")
            clear = gr.Button("Clear", elem_id="clear-chat")
        with gr.Accordion("Generation settings", open=False):
            system = gr.Textbox(label="System prompt")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
                max_tokens = gr.Slider(16, 2048, value=256, step=16, label="Max new tokens")
        with gr.Accordion("Attach an adapter", open=False):
            with gr.Row():
                adapter_path = gr.Textbox(label="Adapter folder (a weitiao LoRA run)", elem_id="adapter-path")
                adapter_name = gr.Textbox(label="Name (default: the folder's name)")
            attach = gr.Button("Attach")
            attach_status = gr.Markdown(elem_id="attach-status")
        history_a, history_b = gr.State([]), gr.State([])
        in_flight = gr.State({})  # this browser session's generations, so Stop can cancel them

    def respond(*inputs):
        yield from _chat_reply(engine, *inputs)

    def stop_generations(running):
        for generation in list(running.values()):
            generation.cancel()

    def toggle_side_by_side(both, other):
        return gr.Dropdown(visible=both), gr.Chatbot(visible=both, label=other)

    chat_inputs = [prompt, history_a, history_b, model_a, model_b, side_by_side, system, temperature, top_p,
                   max_tokens, in_flight]
    chat_outputs = [prompt, chat_a, chat_b, history_a, history_b]
    submitted = prompt.submit(respond, chat_inputs, chat_outputs)
    stop_chat.click(stop_generations, in_flight, None, cancels=[submitted])
    clear.click(lambda: ([], [], [], []), None, [chat_a, chat_b, history_a, history_b])
    side_by_side.change(toggle_side_by_side, [side_by_side, model_b], [model_b, chat_b])
    model_a.change(lambda name: gr.Chatbot(label=name), model_a, chat_a)
    model_b.change(lambda name: gr.Chatbot(label=name), model_b, chat_b)
    attach.click(lambda path, name: _attach_adapter(engine, path, name), [adapter_path, adapter_name],
                 [attach_status, model_a, model_b])

    def current_models():  # adapters attached since the page was built (a reload shows them too)
        return gr.Dropdown(choices=engine.names), gr.Dropdown(choices=engine.names)

    app.load(current_models, None, [model_a, model_b])


def _chat_reply(engine: Engine, message, conversation_a, conversation_b, first, other, both, system_prompt, temp,
                nucleus, limit, running):
    """Send the message to one model (or two, side by side) and stream both conversations as the replies grow;
    the replies are cancelled when the page stops listening."""
    message, system_prompt = (message or "").strip(), (system_prompt or "").strip()  # empty boxes: None
    if not message:
        yield gr.skip(), conversation_a, conversation_b, conversation_a, conversation_b
        return
    params = SamplingParams(max_tokens=int(limit), temperature=float(temp), top_p=float(nucleus))
    prefix = [_message("system", system_prompt)] if system_prompt else []
    conversations = [answered(conversation_a), answered(conversation_b)]
    generations: list[tuple[int, Generation]] = []
    for side, model in enumerate([first, other] if both else [first]):  # queue all: they run back to back
        conversation = conversations[side] + [_message("user", message)]
        try:
            messages = engine.fit_messages(model, prefix + conversation, params.max_tokens)
            generation = engine.chat(model, messages, params)
        except WeitiaoError as error:  # a toast; the conversation stays as it was
            gr.Warning(f"{model}: {error}")
            continue
        running[id(generation)] = generation
        conversations[side] = conversation + [_message("assistant", "")]
        generations.append((side, generation))

    def update():
        return "", conversations[0], conversations[1], conversations[0], conversations[1]

    yield update()
    try:
        for side, generation in generations:
            for piece in generation:
                reply = conversations[side][-1]["content"] + piece
                conversations[side][-1] = _message("assistant", reply)
                yield update()
    finally:
        for _, generation in generations:
            generation.cancel()
            running.pop(id(generation), None)
    yield update()


def _attach_adapter(engine: Engine, path, name):
    """Attach the adapter folder under `name` (default: the folder's name); the status line and both model lists."""
    path = path.strip()
    name = name.strip() or Path(path).resolve().name
    try:
        engine.add_adapter(name, path)
    except WeitiaoError as error:
        return f"⚠️ {error}", gr.Dropdown(), gr.Dropdown()
    return (f"Attached `{name}`.", gr.Dropdown(choices=engine.names, value=name),
            gr.Dropdown(choices=engine.names))


def _train_tab(engine: Engine, runs_dir: Path, trainer: Trainer) -> None:
    """The main training settings, run as `weitiao train CONFIG` in a subprocess, with a live loss plot."""
    with gr.Tab("Train"):
        gr.Markdown("Fine-tune with the main settings: *Start* writes them into a weitiao config and runs "
                    "`weitiao train` on it, so the output is a run folder like any other.")
        with gr.Row():
            train_model = gr.Textbox(value=engine.base_name, label="Base model", elem_id="train-model")
            run_name = gr.Textbox(value=lambda: time.strftime("run-%Y%m%d-%H%M%S"), label="Run name",
                                  elem_id="run-name", info=f"saved under {runs_dir}/")
        with gr.Row():
            train_file = gr.Textbox(value=str(DEMO_DATA / "extract_train.jsonl"), label="Training data file",
                                    elem_id="train-file", info="json / jsonl / csv / parquet")
            eval_file = gr.Textbox(value=str(DEMO_DATA / "extract_test.jsonl"), label="Evaluation data file",
                                   elem_id="eval-file", info="optional; without it a share of the training "
                                   "data is held out")
            val_size = gr.Number(value=0.1, label="Held-out share (no eval file)", minimum=0, maximum=0.5)
        with gr.Row():
            method = gr.Radio(["lora", "full"], value="lora", label="Method")
            template = gr.Dropdown(TEMPLATES, value="auto", label="Prompt template")
            lora_r = gr.Number(value=16, label="LoRA rank", precision=0, minimum=1)
            max_length = gr.Number(value=256, label="Max tokens per example", precision=0, minimum=8)
        with gr.Row():
            learning_rate = gr.Number(value=1e-3, label="Learning rate", minimum=0)
            epochs = gr.Number(value=1, label="Epochs", minimum=0)
            max_steps = gr.Number(value=40, label="Max steps (-1: by epochs)", precision=0, elem_id="max-steps")
            batch_size = gr.Number(value=8, label="Batch size", precision=0, minimum=1, elem_id="batch-size")
            logging_steps = gr.Number(value=2, label="Log every N steps", precision=0, minimum=1)
        compare = gr.Checkbox(value=True, label="Compare base and fine-tuned on the eval data after training "
                              "(writes the report)", elem_id="compare")
        with gr.Row():
            start = gr.Button("Start training", variant="primary", elem_id="start-training")
            stop_training = gr.Button("Stop", variant="stop", elem_id="stop-training")
        train_status = gr.Markdown("No run started yet.", elem_id="train-status")
        loss_plot = gr.LinePlot(loss_frame([]), x="step", y="loss", color="series", title="Loss",
                                color_map={"training": "#2f80ed", "validation": "#eb5757"}, elem_id="loss-plot",
                                height=320)
        train_log = gr.Textbox(label="Log (last lines)", lines=LOG_LINES, max_lines=LOG_LINES, elem_id="train-log")
        poll = gr.Timer(1.5)

    def start_run(*fields):
        *settings, name = fields
        try:
            output_dir = run_output_dir(runs_dir, (name or "").strip() or time.strftime("run-%Y%m%d-%H%M%S"))
            return trainer.start(training_config(*settings, output_dir=str(output_dir))).status()
        except WeitiaoError as error:
            return f"⚠️ {error}"

    def stop_run():
        trainer.stop()
        return trainer.current.status() if trainer.current else "No run started yet."

    def show_progress():
        current = trainer.current
        if current is None:
            return gr.skip(), gr.skip(), gr.skip()
        return current.status(), loss_frame(current.metrics()), current.log_tail()

    start.click(start_run, [train_model, train_file, eval_file, val_size, template, method, epochs, max_steps,
                            learning_rate, batch_size, lora_r, max_length, logging_steps, compare, run_name],
                train_status)
    stop_training.click(stop_run, None, train_status)
    poll.tick(show_progress, None, [train_status, loss_plot, train_log])


def _eval_tab(app: gr.Blocks, runs_dir: Path) -> None:
    """A run folder's report (under runs_dir only), its plots and sample answers."""
    with gr.Tab("Eval"):
        with gr.Row():
            runs = list_runs(runs_dir)
            run_picker = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run folder",
                                     allow_custom_value=True, elem_id="run-picker", scale=4)
            refresh_runs = gr.Button("Refresh list", scale=1)
        report = gr.Markdown(elem_id="report")
        loss_image = gr.Image(label="Training and validation loss", type="pil", interactive=False,
                              elem_id="loss-image", height=360)
        metrics_image = gr.Image(label="Base vs fine-tuned", type="pil", interactive=False, elem_id="metrics-image")
        samples = gr.Markdown(elem_id="samples")

    def show_report(path):
        if not path:
            return load_report("")
        try:
            return load_report(str(report_folder(runs_dir, path)))
        except WeitiaoError as error:
            return f"⚠️ {error}", None, None, ""

    run_picker.change(show_report, run_picker, [report, loss_image, metrics_image, samples])
    app.load(show_report, run_picker, [report, loss_image, metrics_image, samples])  # the preselected run
    refresh_runs.click(lambda: gr.Dropdown(choices=list_runs(runs_dir)), None, run_picker)


def launch(engine: Engine, host: str = "127.0.0.1", port: int = 7860, runs_dir: str | Path = "outputs",
           allowed_hosts: list[str] | None = None) -> None:
    """Serve the web UI until interrupted; a training run still going then is stopped too. allowed_hosts: the
    Host headers it answers (None: any)."""
    from starlette.middleware import Middleware

    from weitiao.serve.server import HostCheck

    trainer = Trainer()
    app = build_app(engine, runs_dir, trainer)
    print(f"weitiao web UI at http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        app.queue().launch(server_name=host, server_port=port, ssr_mode=False, show_error=True, quiet=True,
                           app_kwargs={"middleware": [Middleware(HostCheck, allowed_hosts=allowed_hosts)]})
    finally:
        trainer.stop()
