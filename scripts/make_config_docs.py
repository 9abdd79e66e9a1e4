"""Writes docs/config.md from the config classes (their field docstrings are the documentation).
Run: python scripts/make_config_docs.py   (tests/test_config.py checks the file is current)"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from weitiao.config import BenchmarkConfig, CleanConfig, Config, DataSource, SelectConfig, _section_type
from weitiao.methods import method_table

TARGET = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("weitiao.config.", "")
    return text.replace("<class '", "").replace("'>", "")


def _section(model: type[BaseModel], prefix: str) -> list[str]:
    lines = [f"## `{prefix}`" if prefix else "## top level", "", "| key | type | default | meaning |",
             "|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        section = _section_type(field.annotation)
        if section is not None and section is not DataSource and typing.get_origin(field.annotation) is not list:
            nested.append((section, f"{prefix}.{name}" if prefix else name))
            continue
        default = "" if field.is_required() else repr(field.get_default(call_default_factory=True))
        description = (field.description or "").replace("\n", " ").replace("|", "\\|")
        lines.append(f"| `{name}` | `{_type_name(field.annotation)}` | `{default}` | {description} |")
    lines.append("")
    for section, path in nested:
        lines += _section(section, path)
    return lines


def render() -> str:
    intro = ["# Configuration", "",
             "One YAML file configures a run; any key can be overridden on the command line: "
             "`--train.learning_rate 1e-4`, `--learning_rate=1e-4` (a unique key name is enough) or "
             "`--model PATH`. Unknown keys are errors (with a suggestion). Relative data paths are relative to the "
             "config file. Each entry of `data.train` / `data.eval` is a path or a source:", ""]
    source = _section(DataSource, "data.train[]")
    benchmark = _section(BenchmarkConfig, "eval.benchmarks[]")
    benchmark[2:2] = ["Each entry of `eval.benchmarks` is an lm-eval task name or a benchmark (see docs/eval.md):", ""]
    commands = []
    for command, section in (("clean", CleanConfig), ("select", SelectConfig)):
        lines = _section(section, command)
        lines[0:1] = [f"## `weitiao data {command}` options", "",
                      f"Each key is an option of `weitiao data {command}`, written with dashes (`max_length` is "
                      "`--max-length 512`); a switch is `--key` / `--no-key`. See docs/data-selection.md."]
        commands += lines
    methods = ["## Methods", "", "`method` takes one of these (the registry in `src/weitiao/methods.py`); each reads "
               "its settings from the section named:", "", method_table(), ""]
    return "\n".join(intro + _section(Config, "") + source + benchmark + methods + commands) + "\n"


if __name__ == "__main__":
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(render(), encoding="utf-8")
    print(f"wrote {TARGET}", file=sys.stderr)
