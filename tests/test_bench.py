"""The peer benchmark's instruments (bench/peers.py): the token count every HF-Trainer peer is measured by, and the
table's pairing of each peer with the fastest weitiao row inside its memory."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_peer_clock_counts_the_real_tokens_that_enter_the_model(monkeypatch, tiny_model_dir, tokenizer):
    """Padded batches of different lengths: the clock's count over the measured steps is the number of non-pad
    tokens in those batches, not the padded size."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import peers

    monkeypatch.setattr(Trainer, "__init__", Trainer.__init__)  # the clock patches it; put it back afterwards
    timer = peers.clock_hf_trainers(warmup=peers.LOG_EVERY)
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(5, 1000, (int(length),), generator=generator).tolist()}
                for length in torch.randint(3, 40, (40,), generator=generator)]
    real, padded = [], []

    def collate(rows):
        longest = max(len(row["input_ids"]) for row in rows)
        ids = torch.tensor([row["input_ids"] + [0] * (longest - len(row["input_ids"])) for row in rows])
        mask = (torch.arange(longest)[None] < torch.tensor([len(row["input_ids"]) for row in rows])[:, None]).long()
        real.append(int(mask.sum()))
        padded.append(ids.numel())
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    steps = 2 * peers.LOG_EVERY
    arguments = TrainingArguments(output_dir=str(Path(tiny_model_dir).parent / "clock"), max_steps=steps,
                                  per_device_train_batch_size=4, use_cpu=True, report_to=[], save_strategy="no",
                                  disable_tqdm=True, remove_unused_columns=False, logging_steps=100)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    Trainer(model=model, args=arguments, train_dataset=examples, data_collator=collate).train()
    measured = timer.points[-1][1] - timer.start[1]
    assert measured == sum(real[peers.LOG_EVERY:steps])
    assert measured < sum(padded[peers.LOG_EVERY:steps])
    assert timer.tokens_per_second() > 0


def test_each_peer_is_paired_with_the_fastest_weitiao_row_inside_its_memory(capsys):
    import peers

    def row(variant, tokens_per_s, memory, **extra):
        return {"peer": variant.split(":")[0], "variant": variant, "method": variant.split(":")[1],
                "real_tokens_per_s": tokens_per_s, "peak_mem_gib": memory, "mfu": 0.1, **extra}

    rows = [row("trl:lora", 40_000, 14.3), row("trl:lora:ckpt", 28_000, 4.2),
            row("unsloth:lora:ckpt", 17_000, 3.3), row("axolotl:lora", 0.0, None, error="not installed"),
            row("weitiao:lora", 80_000, 12.8), row("weitiao:lora:ckpt", 42_000, 4.1),
            row("weitiao:lora:ckpt,offload", 50_000, 3.6), row("weitiao:full", 60_000, 30.0)]
    peers.print_table(rows, argparse.Namespace(shape="1b", steps=20, warmup=5))
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and ":" in line.split()[0]}
    assert "weitiao 2.00x (weitiao:lora at 12.8 GiB vs trl:lora)" in lines["trl:lora"]
    assert "weitiao 1.79x (weitiao:lora:ckpt,offload at 3.6 GiB vs trl:lora:ckpt)" in lines["trl:lora:ckpt"]
    assert "weitiao" not in lines["unsloth:lora:ckpt"]  # no weitiao row fits in 3.3 GiB
    assert "not installed" in lines["axolotl:lora"]
    assert "weitiao 2.00x (weitiao:lora at 12.8 GiB vs trl:lora)" in lines["weitiao:lora"]
    assert lines["weitiao:full"].rstrip().endswith("%")  # no full fine-tuning peer in the table


def _train_with_lag(model, step: int, steps: int):
    """`steps` SGD steps of `model` on one short row, HostGpuLag marking step `step`; returns the lag, its hooks
    still attached, and a function that runs one more step."""
    import train_speed

    lag = train_speed.HostGpuLag(step=step)
    lag.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(5, 100, (1, 8))

    def train_step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(steps):
        train_step()
    return lag, train_step


def test_lag_marks_each_layer_of_the_chosen_step_in_order(tiny_model_dir):
    """bench/train_speed.py's `lag` option: marks only in the chosen optimizer step, each decoder layer's forward in
    order, their backward in reverse, the optimizer step, then the next step's start; hooks gone afterwards."""
    from transformers import AutoModelForCausalLM

    lag, train_step = _train_with_lag(AutoModelForCausalLM.from_pretrained(tiny_model_dir), step=2, steps=3)
    assert [label for label, *_ in lag.marks] == [
        "forward starts (after a sync)", "layer 0 forward", "layer 1 forward", "forward returned (loss included)",
        "layer 1 backward done", "layer 0 backward done", "backward done: optimizer step starts",
        "optimizer step launched", "next step: forward starts"]
    hosts = [host for _, host, *_ in lag.marks]
    assert hosts == sorted(hosts)
    assert lag.steps_done == 3
    lag.detach()
    train_step()
    assert lag.steps_done == 3 and len(lag.marks) == 9
    assert "layer 1 backward done" in lag.table() and all(peak is None for *_, peak in lag.marks)  # no GPU here


def test_lag_names_a_checkpointed_layers_recomputation_and_marks_its_backward_once(tiny_model_dir):
    """With gradient checkpointing each layer's forward runs again in the backward pass: marked as its recomputation,
    before that layer's single `backward done`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    lag, _ = _train_with_lag(model, step=1, steps=2)
    lag.detach()
    assert [label for label, *_ in lag.marks] == [
        "forward starts (after a sync)", "layer 0 forward", "layer 1 forward", "forward returned (loss included)",
        "layer 1 recomputed", "layer 1 backward done", "layer 0 recomputed", "layer 0 backward done",
        "backward done: optimizer step starts", "optimizer step launched", "next step: forward starts"]
