"""`weitiao demo`: the whole pipeline on the default model and the bundled demo data, in a few minutes."""

from __future__ import annotations

import time
from pathlib import Path

from weitiao.config import load_config
from weitiao.runs import RunFolder

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


def run_demo(overrides: list[str] | None = None) -> dict:
    from weitiao.eval.compare import compare_run
    from weitiao.eval.report import format_samples, format_table
    from weitiao.train import run

    started = time.time()
    config = load_config(DEMO_CONFIG, overrides)
    print(f"weitiao demo: LoRA fine-tuning of SmolLM2-135M-Instruct to answer in a fixed JSON schema\n"
          f"config: {DEMO_CONFIG}\n")
    result = run(config)
    print("\nComparing the base model and the fine-tuned model on the held-out examples...")
    report = compare_run(result.output_dir, config)
    print("\n" + format_table(report) + "\n")
    print(format_samples(report) + "\n")
    print(f"Report: {Path(result.output_dir) / RunFolder.REPORT_MARKDOWN} (with {RunFolder.LOSS_PLOT} and "
          f"{RunFolder.METRICS_PLOT})")
    print(f"Adapter: {result.output_dir} (loads with peft.PeftModel.from_pretrained)")
    print(f"Demo finished in {time.time() - started:.0f} s")
    return report
