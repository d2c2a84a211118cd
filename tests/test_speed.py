"""The speed work's properties (issue 19), on the tiny model: what a run imports, what it logs, how grouped steps
weigh their tokens. Times are measured by bench/steps.py, bench/grouping.py and bench/startup.py, never here.

    $ python -m pytest -q tests/test_speed.py
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_small_alpaca

TINY = ["--model", "builtin:tiny-llama"]


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory) -> Path:
    """Twelve rows of clearly different lengths: grouped steps differ in their token counts."""
    words = "apple river stone cloud green seven table music amber north salt violet".split()
    rows = [{"instruction": f"Repeat {w} " + "please " * (i % 4), "input": "",
             "output": " ".join([w] * (1 + (i * 5) % 11))} for i, w in enumerate(words)]
    path = tmp_path_factory.mktemp("data") / "varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def token_losses(model, dataset, indices) -> tuple[float, int]:
    """(summed next-token loss, loss tokens) of the examples `indices`, one at a time, in plain torch."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for i in indices:
        ids = torch.tensor([dataset[i]["input_ids"]])
        labels = torch.tensor(dataset[i]["labels"])[1:]
        logits = model(input_ids=ids).logits[0, :-1].float()
        keep = labels != -100
        total = total + F.cross_entropy(logits[keep], labels[keep], reduction="sum")
        count += int(keep.sum())
    return total, count


def training_data(data: Path, **flags):
    from ftcli.config import build_run_config
    from ftcli.data import load_training_dataset
    from ftcli.models import apply_pad_policy, load_tokenizer

    config = build_run_config({"method": "lora", "model": "builtin:tiny-llama", "dataset": str(data), **flags})
    tokenizer = load_tokenizer(config.model)
    apply_pad_policy(tokenizer)
    return load_training_dataset(config, tokenizer)[0]


def base_model():
    import torch
    from transformers import AutoModelForCausalLM

    from ftcli.builtin import resolve_builtin_model

    return AutoModelForCausalLM.from_pretrained(str(resolve_builtin_model("builtin:tiny-llama")),
                                                dtype=torch.float32).eval()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_never_imports_bitsandbytes(tmp_path: Path) -> None:
    """A whole `ftcli train --method lora` process: bitsandbytes (installed here) is never imported, and the run
    finishes and saves its adapter."""
    pytest.importorskip("bitsandbytes")
    data = write_small_alpaca(tmp_path / "small.jsonl")
    out = tmp_path / "run"
    args = ["train", "--method", "lora", *TINY, "--dataset", str(data), "--max-steps", "1", "--output-dir", str(out)]
    # The app itself (what `python -m ftcli` runs): this process looks at its modules after.
    code = ("import sys\n"
            f"sys.argv = ['ftcli', *{args!r}]\n"
            "from ftcli.cli import app\n"
            "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('BNB', sys.modules.get('bitsandbytes') is not None, 'PEFT', 'peft' in sys.modules)\n"
)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "BNB False PEFT True" in proc.stdout
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "ftcli_run.json").read_text())["status"] == "finished"


def test_qlora_after_lora_in_one_process_still_loads_4bit(cli, tmp_path: Path) -> None:
    """The lora run's 'bitsandbytes is absent' ends with it: a QLoRA run later in the same process loads 4-bit."""
    pytest.importorskip("bitsandbytes")
    data = write_small_alpaca(tmp_path / "small.jsonl")
    for method in ("lora", "qlora"):
        result = cli("train", "--method", method, *TINY, "--dataset", data, "--max-steps", 1,
                     "--output-dir", tmp_path / method)
        assert result.exit_code == 0, result.stdout
    assert sys.modules.get("bitsandbytes") is not None
    record = json.loads((tmp_path / "qlora" / "ftcli_run.json").read_text())
    assert record["precision"]["weights"].get("nf4", 0) > 0  # the frozen base's linear layers are 4-bit NF4


def test_cpu_run_logs_the_plain_loss_and_no_vocabulary_metrics(cli, tmp_path: Path) -> None:
    """On CPU the trainer's loss is the model's own cross-entropy: step 1 of one batch holding all 8 examples
    logs their mean token loss at the initial weights (LoRA starts as the base model), TRL's num_tokens is still
    logged (the non-padding tokens), and the full-vocabulary entropy / token accuracy are no longer computed."""
    data = write_small_alpaca(tmp_path / "small.jsonl")
    out = tmp_path / "run"
    result = cli("train", "--method", "lora", *TINY, "--dataset", data, "--batch-size", 8, "--max-steps", 1,
                 "--no-group-by-length", "--dtype", "float32", "--output-dir", out)
    assert result.exit_code == 0, result.stdout
    (record,) = metrics(out)
    assert {"loss", "grad_norm", "learning_rate", "num_tokens"} <= record.keys()
    assert not {"entropy", "mean_token_accuracy"} & record.keys()
    dataset = training_data(data, dtype="float32")
    import torch

    with torch.no_grad():
        total, count = token_losses(base_model(), dataset, range(len(dataset)))
    assert record["loss"] == pytest.approx(float(total) / count, rel=1e-4)
    assert record["num_tokens"] == sum(len(r["input_ids"]) for r in dataset)


def test_grouped_steps_log_their_mean_loss(cli, varied_data: Path, tmp_path: Path) -> None:
    """Grouped steps train on loss / the epoch's mean tokens per step, but still log each step's own mean token
    loss: step 1's logged loss is that of the first step of `grouped_order` at the initial weights."""
    from ftcli.training import batching

    out = tmp_path / "grouped"
    result = cli("train", "--method", "lora", *TINY, "--dataset", varied_data, "--batch-size", 2, "--max-steps", 1,
                 "--dtype", "float32", "--output-dir", out)
    assert result.exit_code == 0, result.stdout
    dataset = training_data(varied_data, dtype="float32")
    first = batching.grouped_order(batching.example_lengths(dataset), 2, seed=42, epoch=0)[:2]
    import torch

    with torch.no_grad():
        total, count = token_losses(base_model(), dataset, first)
    assert metrics(out)[0]["loss"] == pytest.approx(float(total) / count, rel=1e-4)


def test_grouped_gradient_is_token_weighted(varied_data: Path, tmp_path: Path) -> None:
    """The real trainer's grouped step: its num_items_in_batch is the epoch's mean loss tokens per step (counted
    here in Python), its gradient that of the summed token loss over that mean (plain torch on a copy of the
    model), and the loss it reports the step's own mean."""
    import torch

    from ftcli.config import build_run_config
    from ftcli.training import batching
    from ftcli.training.setup import set_up
    from ftcli.training.trainer import build_trainer

    config = build_run_config({"method": "lora", "model": "builtin:tiny-llama", "dataset": str(varied_data),
                               "batch_size": 2, "gradient_accumulation_steps": 2, "dtype": "float32",
                               "max_steps": 1, "output_dir": str(tmp_path / "run")})
    ready = set_up(config, "train")
    reference = copy.deepcopy(ready.plan.model)
    (tmp_path / "run").mkdir()
    trainer, _ = build_trainer(config, ready.plan, ready.tokenizer, ready.dataset, tmp_path / "run",
                               tmp_path / "run" / "logs", ready.device)
    trainer.model.train()
    loader = trainer.get_train_dataloader()
    batches = list(iter(loader))[:2]  # one optimizer step: 2 micro-batches of 2
    dataset = ready.dataset
    tokens = sum(sum(1 for t in row["labels"][1:] if t != -100) for row in dataset)
    expected = tokens / -(-len(dataset) // 4)
    num_items = trainer._get_num_items_in_batch(batches, trainer.args.device)
    assert float(num_items) == pytest.approx(expected)
    model = trainer.model
    model.zero_grad()
    reported = sum(float(trainer.training_step(model, dict(b), num_items).detach()) for b in batches)

    order = batching.grouped_order(batching.example_lengths(dataset), 4, seed=42, epoch=0)[:4]
    total, count = token_losses(reference.train(), dataset, order)
    (total / expected).backward()
    assert reported == pytest.approx(float(total.detach()) / count, rel=1e-4)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_grouped_order_is_a_deterministic_permutation_of_whole_steps() -> None:
    """The grouped order: a permutation of every example, the same for the same seed and epoch, another for
    another seed; every full step sorted longest first, the short step (the leftover) last."""
    from ftcli.training import batching

    lengths = [(i * 37) % 101 + 1 for i in range(203)]
    order = batching.grouped_order(lengths, 8, seed=3, epoch=1)
    assert sorted(order) == list(range(203))
    assert order == batching.grouped_order(lengths, 8, seed=3, epoch=1)
    assert order != batching.grouped_order(lengths, 8, seed=4, epoch=1)
    steps = [order[k:k + 8] for k in range(0, 203, 8)]
    assert len(steps[-1]) == 203 % 8
    for step in steps:
        assert [lengths[i] for i in step] == sorted((lengths[i] for i in step), reverse=True)
    assert lengths[steps[0][0]] == max(lengths)
    assert batching.loss_tokens_per_step(DictRows([{"labels": [-100, 1, 2]}, {"labels": [5, -100, 3, 4]}]), 1) == 2.0


class DictRows(list):
    """A list of rows standing in for a dataset (no Arrow: the Python count)."""

    def with_format(self, *_):
        raise TypeError("not a datasets.Dataset")


# ---- start-up (issue 19 item 3): what the CLI imports ----------------------------------------------------------

HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate")


def child(code: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *argv, "-c", code] if code else [sys.executable, *argv], env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_and_every_command_module_import_no_heavy_library() -> None:
    """`python -m ftcli --help` (a real process, its imports listed by -X importtime) and importing the CLI with
    every command module (ftcli/cli/*.py) load none of torch, transformers, TRL, peft, datasets, bitsandbytes."""
    proc = child("", "-X", "importtime", "-m", "ftcli", "--help")
    assert proc.returncode == 0 and "train" in proc.stdout, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "ftcli.cli.train" in imported and "typer" in imported  # the listing is real
    assert not imported & set(HEAVY), imported & set(HEAVY)
    modules = sorted(p.stem for p in (Path(__file__).parent.parent / "ftcli" / "cli").glob("*.py"))
    assert {"train", "chat", "eval", "generate", "prepare"} <= set(modules)
    proc = child("import importlib, json, sys\n"
                 f"for name in {modules!r}:\n    importlib.import_module('ftcli.cli.' + name)\n"
                 f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
