"""The run folder: the one place that knows its layout. Training writes it; evaluation, merge, the serving engine
and the web UI read it through `RunFolder`, never by file name.

    config.yaml          the config as given (validated), reloadable with `weitiao train`
    settings.json        what actually ran: every automatic choice resolved (weitiao.train.settings)
    data_stats.json      examples read, dropped, truncated, tokens (weitiao.data.dataset)
    metrics.jsonl        one JSON line per log point: training loss, learning rate, eval metrics
    checkpoints/step-N/  resumable state while training (removed when the run finishes)
    adapter_config.json + adapter_model.safetensors, or config.json + model.safetensors: what trained
    tokenizer files      with the chat template trained on
    generation_config.json  its EOS list includes the template's end-of-turn token
    train_result.json    the run's summary (steps, tokens, time, losses)
    report.json          base vs tuned (weitiao.eval.compare); report.md, the plots (loss_curves.png, metrics.png,
                         confusion.png) and predictions.jsonl are renderings of it
    runs/                TensorBoard event files (train.report_to: [tensorboard])
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from weitiao.config import TEMPLATE_STOPS, Config, config_from_dict, dump_config, load_config
from weitiao.data.templates import template_stops
from weitiao.errors import ConfigError, ModelLoadError, WeitiaoError
from weitiao.models import resolve_model

log = logging.getLogger("weitiao.runs")

# Model config fields that must agree between an adapter's base and the model it is attached to.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "vocab_size")


class RunFolder:
    CONFIG = "config.yaml"
    SETTINGS = "settings.json"
    DATA_STATS = "data_stats.json"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    TRAINER_STATE = "trainer_state.json"
    RESULT = "train_result.json"
    REPORT = "report.json"
    REPORT_MARKDOWN = "report.md"
    LOSS_PLOT = "loss_curves.png"
    METRICS_PLOT = "metrics.png"
    CONFUSION_PLOT = "confusion.png"
    PREDICTIONS = "predictions.jsonl"
    TRACKER_LOGS = "runs"

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- what it holds ----------------------------------------------------------------------------

    @property
    def holds_adapter(self) -> bool:
        return (self.path / "adapter_config.json").is_file()

    @property
    def holds_model(self) -> bool:
        return (self.path / "config.json").is_file()

    @property
    def is_run(self) -> bool:
        """Written by weitiao (has a config), finished or not."""
        return (self.path / self.CONFIG).is_file() or (self.path / self.METRICS).is_file()

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer_config.json").is_file()

    @classmethod
    def adapter(cls, path: str | Path) -> RunFolder:
        """An existing folder holding a PEFT adapter (a weitiao run or any PEFT save), or a clear error."""
        run = cls(path)
        if not run.path.exists():
            raise WeitiaoError(f"adapter folder not found: {path}")
        if not run.holds_adapter:
            if run.holds_model:
                raise WeitiaoError(f"{path} holds a full model, not an adapter: pass it as the MODEL argument instead")
            raise WeitiaoError(f"{path} is not an adapter folder (no adapter_config.json)")
        return run

    def check_trained(self) -> None:
        """Training finished here: the folder holds an adapter or a full model."""
        if not (self.holds_adapter or self.holds_model):
            raise ConfigError(f"{self.path} holds neither a PEFT adapter nor a model")

    # -- starting a run ---------------------------------------------------------------------------

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Check that a new run may write here (or that --resume has something to resume)."""
        if resume:
            if self.latest_checkpoint() is None:
                raise ConfigError(f"--resume: no checkpoint in {self.path / self.CHECKPOINTS} (set train.save_steps "
                                  "to write them)")
            return
        if not self.path.exists():
            return
        if not overwrite:
            checkpoints = self.path / self.CHECKPOINTS
            if checkpoints.is_dir() and any(checkpoints.iterdir()):
                raise ConfigError(f"{self.path} holds checkpoints of an unfinished run: pass --resume to continue it, "
                                  "or --overwrite_output_dir true to start again")
            if self.holds_adapter or self.holds_model:
                raise ConfigError(f"{self.path} already holds a trained model: choose another train.output_dir, or "
                                  "pass --overwrite_output_dir true")
        # A new run starts a new log: what an earlier run (finished, or stopped before its first checkpoint) wrote
        # must not join this one's curves and report.
        for name in (self.METRICS, self.RESULT, self.REPORT, self.REPORT_MARKDOWN, self.LOSS_PLOT, self.METRICS_PLOT,
                     self.CONFUSION_PLOT, self.PREDICTIONS):
            (self.path / name).unlink(missing_ok=True)
        self.remove_checkpoints()

    def write_start(self, config: Config, settings: dict[str, Any], data_stats: dict[str, Any]) -> None:
        """What a run knows before its first step: its config, its resolved settings and its data."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / self.CONFIG).write_text(dump_config(config), encoding="utf-8")
        self._write_json(self.SETTINGS, settings)
        self._write_json(self.DATA_STATS, data_stats)

    # -- config and settings ----------------------------------------------------------------------

    def config(self, overrides: list[str] | dict[str, Any] | None = None) -> Config:
        if not (self.path / self.CONFIG).is_file():
            raise ConfigError(f"{self.path} is not a weitiao run folder (no {self.CONFIG})")
        return load_config(self.path / self.CONFIG, overrides)

    def raw_config(self) -> dict[str, Any]:
        """config.yaml as a plain mapping, {} when there is none or it does not parse (folders from elsewhere,
        or written by another weitiao version)."""
        path = self.path / self.CONFIG
        if not path.is_file():
            return {}
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def settings(self) -> dict[str, Any]:
        return self._read_json(self.SETTINGS)

    # -- metrics ----------------------------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        with (self.path / self.METRICS).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """The log so far; a line being written right now (a running run) ends it."""
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    def truncate_metrics(self, last_step: int) -> None:
        """Drop the log lines after `last_step` (a resumed run writes them again)."""
        if (self.path / self.METRICS).is_file():
            kept = [record for record in self.metrics() if record["step"] <= last_step]
            (self.path / self.METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    # -- checkpoints ------------------------------------------------------------------------------

    def checkpoint(self, step: int) -> Path:
        return self.path / self.CHECKPOINTS / f"step-{step}"

    def latest_checkpoint(self) -> Path | None:
        folder = self.path / self.CHECKPOINTS
        found = [p for p in folder.glob("step-*") if (p / self.TRAINER_STATE).is_file()] if folder.is_dir() else []
        return max(found, key=_step_of, default=None)

    def write_trainer_state(self, checkpoint: Path, state: dict[str, Any], keep: int) -> None:
        """Complete a checkpoint with the loop's counters (written last: a checkpoint without them is not one)
        and delete the oldest so that `keep` remain."""
        (checkpoint / self.TRAINER_STATE).write_text(json.dumps(state, indent=2))
        older = sorted((p for p in (self.path / self.CHECKPOINTS).glob("step-*") if p != checkpoint), key=_step_of)
        for stale in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)

    def trainer_state(self, checkpoint: Path) -> dict[str, Any]:
        return json.loads((checkpoint / self.TRAINER_STATE).read_text())

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self.path / self.CHECKPOINTS, ignore_errors=True)

    # -- the trained result -----------------------------------------------------------------------

    def save_trained(self, model, state_dict: dict[str, Any], tokenizer, stops: list[str]) -> None:
        """A PEFT adapter folder or a full model folder that plain PEFT / transformers load, the tokenizer with the
        chat template trained on, and a generation config whose EOS list includes the template's end-of-turn
        token."""
        model.save_pretrained(self.path, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(self.path)
        generation = copy.deepcopy(getattr(model, "generation_config", None))
        if generation is not None:
            eos = _as_list(generation.eos_token_id)
            vocab = tokenizer.get_vocab()
            for token in [tokenizer.eos_token] + stops:
                if token in vocab and vocab[token] not in eos:
                    eos.append(vocab[token])
            generation.eos_token_id = eos[0] if len(eos) == 1 else eos
            generation.pad_token_id = tokenizer.pad_token_id
            generation.save_pretrained(self.path)
        self.remove_checkpoints()

    def remove_adapter_files(self) -> None:
        """After an adapter was merged into the full model saved here (a reward model); PEFT's model card too."""
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (self.path / name).unlink(missing_ok=True)
        card = self.path / "README.md"
        if card.is_file() and "library_name: peft" in card.read_text(encoding="utf-8", errors="replace"):
            card.unlink()

    def write_result(self, summary: dict[str, Any]) -> None:
        self._write_json(self.RESULT, summary)

    def result(self) -> dict[str, Any]:
        return self._read_json(self.RESULT)

    def write_report(self, report: dict[str, Any]) -> None:
        self._write_json(self.REPORT, report)

    def report(self) -> dict[str, Any] | None:
        """report.json, or None before a comparison was written."""
        return self._read_json(self.REPORT) if (self.path / self.REPORT).is_file() else None

    # -- the base model and how replies end -------------------------------------------------------

    def base_model(self) -> str:
        """The base model an adapter was trained on: the run's config.yaml model as the user named it (e.g.
        'default'), else the base_model_name_or_path PEFT recorded (the resolved folder at training time), which
        is also the fallback when the first one does not resolve here (a path relative to another directory)."""
        peft_config = json.loads((self.path / "adapter_config.json").read_text(encoding="utf-8"))
        named = (self.raw_config().get("model") or {}).get("name_or_path")
        candidates = [str(name) for name in (named, peft_config.get("base_model_name_or_path")) if name]
        if not candidates:
            raise WeitiaoError(f"{self.path}: adapter_config.json does not name its base model; pass the base "
                               "explicitly")
        for candidate in candidates:
            try:
                resolve_model(candidate)
                return candidate
            except ModelLoadError:
                continue
        return candidates[0]

    def check_base(self, base_path: str) -> None:
        """Refuse an adapter whose recorded base is a different model than `base_path` (a resolved model folder).

        Two folders holding the same architecture are accepted (a copied or merged base); when the recorded base
        cannot be found here (a hub id offline), PEFT's own shape checks are the last line of defence."""
        declared = self.base_model()
        try:
            declared_path = resolve_model(declared)
        except ModelLoadError:
            log.warning("cannot check that %s was trained on this base: its base %s is not available here",
                        self.path, declared)
            return
        if Path(declared_path).resolve() == Path(base_path).resolve():
            return
        expected, actual = _architecture(declared_path), _architecture(base_path)
        if expected is not None and actual is not None and expected != actual:
            differences = ", ".join(f"{key} {expected[key]} vs {actual[key]}" for key in expected
                                    if expected[key] != actual[key])
            raise WeitiaoError(f"adapter {self.path} was trained on {declared}, a different model than {base_path} "
                               f"({differences})")

    def generation_config(self):
        """The generation config saved with the trained model (EOS ids of its template), or None."""
        from transformers import GenerationConfig

        if not (self.path / "generation_config.json").is_file():
            return None
        return GenerationConfig.from_pretrained(self.path)

    def eos_token_ids(self, tokenizer, fallback: Any) -> list[int]:
        """End-of-reply ids: this folder's generation_config.json (a weitiao run lists its end-of-turn token there)
        or `fallback` (the model's), plus the tokenizer's EOS."""
        saved = self.generation_config()
        ids = _as_list(saved.eos_token_id if saved is not None else fallback)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        return ids

    def stop_strings(self) -> list[str]:
        """Text that ends a reply besides EOS, from the template the run trained with (none for other folders)."""
        raw = self.raw_config()
        if not raw.get("data"):
            return []
        try:
            return template_stops(config_from_dict({"data": raw["data"]}).data)
        except ConfigError:  # a config of another weitiao version: the named templates' stops still apply
            return list(TEMPLATE_STOPS.get(raw["data"].get("template"), []))

    # ---------------------------------------------------------------------------------------------

    def _write_json(self, name: str, value: dict[str, Any]) -> None:
        (self.path / name).write_text(json.dumps(value, indent=2, ensure_ascii=False), encoding="utf-8")

    def _read_json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def _as_list(ids: Any) -> list[int]:
    return list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []


def _architecture(model_folder: str) -> dict[str, Any] | None:
    config_file = Path(model_folder) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return {key: config.get(key) for key in ARCHITECTURE_KEYS}
