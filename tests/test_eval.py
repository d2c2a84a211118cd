"""Held-out evaluation: the eval loss, the eval split, early stopping, --load-best and `ftcli eval`, on the tiny model.

    $ python -m pytest -q tests/test_eval.py

Every eval loss is checked against an independent computation: the saved model reloaded with plain
transformers/peft, one example at a time, cross-entropy summed over the loss tokens in plain torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import read_manifest

TINY = ["--model", "builtin:tiny-llama"]
TOL = 1e-5  # float32


# ---- data and the independent computation -------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    """Eleven Alpaca rows of different lengths, unlike the training rows."""
    words = "amber violet north table river salt music cloud seven stone apple".split()
    rows = [{"instruction": f"Describe the {w} " + "briefly " * (i % 3), "input": "",
             "output": " ".join([w] * (2 + (i * 3) % 7)) + "."} for i, w in enumerate(words)]
    path = tmp_path_factory.mktemp("eval-data") / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    from conftest import write_small_alpaca

    return write_small_alpaca(tmp_path_factory.mktemp("train-data") / "small.jsonl")


def prepared(tmp_path: Path, data: Path, *extra: str):
    """The examples as ftcli prepares them (input_ids, labels), through `ftcli prepare --output-dir`."""
    from datasets import load_from_disk
    from typer.testing import CliRunner

    from ftcli.cli import app

    out = tmp_path / f"prepared-{data.stem}"
    result = CliRunner().invoke(app, ["prepare", *TINY, "--dataset", str(data), "--output-dir", str(out), *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    return load_from_disk(str(out))


def one_at_a_time(model, examples) -> tuple[float, int]:
    """(mean token loss over every loss token, number of loss tokens), one example per forward pass."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"])[1:]
            logits = model(input_ids=ids).logits[0, :-1].float()
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum").double())
            count += int(keep.sum())
    return total / count, count


def base_model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))


def trained_model(run: Path, tiny_model_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(tiny_model_dir), str(run))


def eval_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def train(cli, data: Path, out: Path, *extra: object, method: str = "lora"):
    result = cli("train", "--method", method, *TINY, "--dataset", data, "--batch-size", 2, "--learning-rate", "1e-2",
                 "--output-dir", out, *extra)
    assert result.exit_code == 0, result.stdout + result.stderr
    return result


def eval_json(cli, *args: object) -> dict:
    result = cli("eval", *args, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the loss definition -------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", [("--eval-batch-size", "1"),
                                      ("--eval-batch-size", "8", "--packing", "--no-group-by-length")])
def test_eval_loss_equals_one_example_at_a_time(cli, tmp_path: Path, train_data: Path, eval_data: Path,
                                                tiny_model_dir: Path, batching: tuple[str, ...]) -> None:
    out = tmp_path / "run"
    result = train(cli, train_data, out, "--eval-dataset", eval_data, "--max-steps", 4, *batching)
    examples = prepared(tmp_path, eval_data)
    want_base, tokens = one_at_a_time(base_model(tiny_model_dir), examples)
    want_final, _ = one_at_a_time(trained_model(out, tiny_model_dir), examples)

    records = eval_records(out)
    steps = [r["step"] for r in records]
    # Step 0, each epoch's end (packed: one step per epoch) and the end of the run, never twice at one step.
    assert steps == ([0, 4] if "--packing" not in batching else [0, 1, 2, 3, 4])
    assert all(r["eval_tokens"] == tokens and r["eval_examples"] == len(examples) for r in records)
    assert abs(records[0]["eval_loss"] - want_base) < TOL
    assert abs(records[-1]["eval_loss"] - want_final) < TOL
    assert want_final < want_base - 1e-3  # the comparison means something: training changed the loss
    manifest = read_manifest(out)
    assert manifest["eval"]["base_loss"] == records[0]["eval_loss"]
    assert manifest["eval"]["final_loss"] == manifest["metrics"]["eval_loss"] == records[-1]["eval_loss"]
    assert f"eval loss: base {want_base:.4f} -> final {want_final:.4f}" in result.stdout

    if "--packing" in batching:
        return
    # `ftcli eval RUN`: its own eval set, the run's eval batch size: the run's number; any batch size: the same loss.
    own = eval_json(cli, out)
    assert abs(own["loss"] - records[-1]["eval_loss"]) < 1e-9 and own["tokens"] == tokens
    for batch in ("1", "8"):
        other = eval_json(cli, out, "--dataset", eval_data, "--batch-size", batch, "--compare-base")
        assert abs(other["loss"] - want_final) < TOL and abs(other["base"]["loss"] - want_base) < TOL
        assert other["examples"] == len(examples)


def test_eval_of_a_bare_model_and_the_text_output(cli, tmp_path: Path, eval_data: Path, tiny_model_dir: Path) -> None:
    want, tokens = one_at_a_time(base_model(tiny_model_dir), prepared(tmp_path, eval_data))
    report = eval_json(cli, "builtin:tiny-llama", "--dataset", eval_data, "--batch-size", 3)
    assert report["kind"] == "model" and abs(report["loss"] - want) < TOL and report["tokens"] == tokens
    result = cli("eval", tiny_model_dir, "--dataset", eval_data)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert f"{want:.4f}" in result.stdout and "perplexity" in result.stdout


def test_fsdp_eval_loss_over_two_processes(tmp_path: Path, train_data: Path, eval_data: Path,
                                          tiny_model_dir: Path) -> None:
    """Two processes share the eleven examples one at a time (6 + 5: the second runs one zero-weight pass to keep
    the sharded model's collectives together): still the same loss."""
    import subprocess
    import sys

    from test_fsdp import child_env, free_port

    out = tmp_path / "fsdp"
    proc = subprocess.run([sys.executable, "-m", "ftcli", "train", "--method", "fsdp", *TINY, "--dataset",
                           str(train_data), "--eval-dataset", str(eval_data), "--eval-batch-size", "1",
                           "--max-steps", "3", "--batch-size", "2", "--learning-rate", "1e-2", "--nproc-per-node",
                           "2", "--master-port", str(free_port()), "--output-dir", str(out)],
                          env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    examples = prepared(tmp_path, eval_data)
    want_base, tokens = one_at_a_time(base_model(tiny_model_dir), examples)
    want_final, _ = one_at_a_time(trained_model(out, tiny_model_dir), examples)
    records = eval_records(out)
    assert read_manifest(out)["resolved"]["processes"] == 2
    assert all(r["eval_examples"] == len(examples) and r["eval_tokens"] == tokens for r in records)
    assert abs(records[0]["eval_loss"] - want_base) < TOL and abs(records[-1]["eval_loss"] - want_final) < TOL


# ---- the held-out split --------------------------------------------------------------------------------


def test_split_is_deterministic_and_never_overlaps() -> None:
    from ftcli.data.split import split_indices

    for total, spec in ((10, 0.2), (400, 0.1), (9, 3), (5, 0.01)):
        train_rows, held = split_indices(total, spec, seed=42)
        assert not set(train_rows) & set(held) and sorted(train_rows + held) == list(range(total))
        assert len(held) == (spec if isinstance(spec, int) else max(1, round(spec * total)))
        assert split_indices(total, spec, seed=42) == (train_rows, held)
    assert split_indices(400, 0.1, seed=1)[1] != split_indices(400, 0.1, seed=2)[1]


def test_eval_split_holds_rows_out_of_training(cli, tmp_path: Path, train_data: Path, tiny_model_dir: Path) -> None:
    from ftcli.data.split import split_indices

    out = tmp_path / "run"
    train(cli, train_data, out, "--eval-split", 2, "--num-epochs", 1)
    everything = prepared(tmp_path, train_data)
    train_rows, held = split_indices(len(everything), 2, seed=42)
    manifest = read_manifest(out)
    assert manifest["data"]["rows_used"] == 6 and manifest["eval"]["examples"] == 2
    # The trainer read exactly the six training rows' tokens in the epoch: none of the held-out ones.
    lengths = [len(ids) for ids in everything["input_ids"]]
    assert manifest["metrics"]["real_tokens"] == sum(lengths[i] for i in train_rows)
    assert manifest["data"]["tokens"] == sum(lengths[i] for i in train_rows)
    want, tokens = one_at_a_time(trained_model(out, tiny_model_dir), everything.select(held))
    assert abs(manifest["eval"]["final_loss"] - want) < TOL and manifest["eval"]["loss_tokens"] == tokens
    # Part of the data fingerprint and the resume identity; a different split is refused on resume.
    assert manifest["data"]["fingerprint"].endswith(";eval_split=2;seed=42")


def test_runs_without_eval_options_keep_their_cache_key_and_identity() -> None:
    from ftcli.config import build_run_config
    from ftcli.data.cache import key_fields
    from ftcli.training.checkpoints import run_identity

    plain = build_run_config({"method": "lora", "model": "builtin:tiny-llama", "dataset": "d.jsonl"})
    assert list(key_fields(plain, "tok", "src")) == [
        "layout", "ftcli_version", "source", "split", "revision", "format", "columns", "template",
        "train_on_inputs", "seq_length", "dataset_size", "seed", "tokenizer"]
    assert run_identity(plain, "fp", 1) == {"method": "lora", "model": "builtin:tiny-llama", "data_fingerprint": "fp",
                                            "batch_size": 4, "gradient_accumulation_steps": 1, "seed": 42,
                                            "processes": 1, "learning_rate": 1e-4, "seq_length": 2048,
                                            "goal": "--num-epochs 1", "lora_rank": 8, "lora_alpha": 16.0,
                                            "lora_dropout": 0.0, "lora_target_modules": [
                                                "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]}  # no eval key
    # An eval dataset leaves the training data's key alone; a held-out split is part of it.
    with_dev = build_run_config({"method": "lora", "model": "builtin:tiny-llama", "dataset": "d.jsonl",
                                 "eval_dataset": "dev.jsonl"})
    assert key_fields(with_dev, "tok", "src") == key_fields(plain, "tok", "src")
    split = build_run_config({"method": "lora", "model": "builtin:tiny-llama", "dataset": "d.jsonl",
                              "eval_split": "0.1"})
    assert key_fields(split, "tok", "src") == {**key_fields(plain, "tok", "src"), "eval_split": 0.1}
    assert run_identity(split, "fp", 1) == {**run_identity(plain, "fp", 1), "eval_split": 0.1}


# ---- early stopping, resume, --load-best ------------------------------------------------------------------


def test_early_stopping_and_load_best_and_resume(cli, tmp_path: Path, train_data: Path, eval_data: Path,
                                                 tiny_model_dir: Path) -> None:
    # Constructed: no evaluation can improve by more than 100, so with patience 3 and an eval every 2 steps
    # the evaluations at 2, 4 and 6 are the three without improvement: the run stops at step 6 of 12.
    args = ["--eval-dataset", eval_data, "--eval-steps", 2, "--early-stopping-patience", 3,
            "--early-stopping-threshold", 100, "--load-best", "--max-steps", 12, "--save-steps", 2,
            "--learning-rate", "5e-2"]
    out = tmp_path / "run"
    result = train(cli, train_data, out, *args)
    manifest = read_manifest(out)
    stopped = manifest["eval"]["early_stopped"]
    assert stopped["step"] == 6 and stopped["best_step"] == 0
    assert train_steps(out) == [1, 2, 3, 4, 5, 6] and manifest["metrics"]["steps"] == 6
    assert "stopped early at step 6" in result.stdout
    records = eval_records(out)
    assert [r["step"] for r in records] == [0, 2, 4, 6]

    # --load-best: the lowest eval loss after training steps; the run folder's adapter is that checkpoint's.
    best = min((r for r in records if r["step"] > 0), key=lambda r: r["eval_loss"])
    assert manifest["eval"]["best"] == {"step": best["step"], "eval_loss": best["eval_loss"],
                                        "checkpoint": f"checkpoint-{best['step']}", "loaded": True}
    saved = load_file(str(out / "adapter_model.safetensors"))
    at_best = load_file(str(out / f"checkpoint-{best['step']}" / "adapter_model.safetensors"))
    assert saved.keys() == at_best.keys() and all(saved[k].equal(at_best[k]) for k in saved)
    assert manifest["eval"]["final_loss"] == best["eval_loss"]
    examples = prepared(tmp_path, eval_data)
    assert abs(one_at_a_time(trained_model(out, tiny_model_dir), examples)[0] - best["eval_loss"]) < TOL
    assert abs(eval_json(cli, out)["loss"] - best["eval_loss"]) < TOL

    # Resumed from step 4 (two evaluations without improvement so far), it stops at step 6 too, not later.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    train(cli, train_data, resumed, *args, "--resume", resumed / "checkpoint-4")
    again = read_manifest(resumed)
    assert again["resumed_from"]["step"] == 4 and again["eval"]["early_stopped"]["step"] == 6
    assert train_steps(resumed) == train_steps(out)
    assert eval_records(resumed) == records or [r["eval_loss"] for r in eval_records(resumed)] == \
        [r["eval_loss"] for r in records]
    assert again["eval"]["best"] == manifest["eval"]["best"]
    resumed_weights = load_file(str(resumed / "adapter_model.safetensors"))
    assert all(resumed_weights[k].equal(saved[k]) for k in saved)


# ---- QLoRA: scored on its 4-bit base ------------------------------------------------------------------------


def test_qlora_run_is_evaluated_on_its_4bit_base(cli, tmp_path: Path, train_data: Path, eval_data: Path) -> None:
    out = tmp_path / "qlora"
    train(cli, train_data, out, "--eval-dataset", eval_data, "--max-steps", 2, method="qlora")
    manifest = read_manifest(out)
    report = eval_json(cli, out, "--compare-base")
    assert report["base_4bit"] is True
    assert abs(report["loss"] - manifest["eval"]["final_loss"]) < TOL
    assert abs(report["base"]["loss"] - manifest["eval"]["base_loss"]) < TOL
    # ... which is the 4-bit base's score, not the float base's.
    float_base = eval_json(cli, "builtin:tiny-llama", "--dataset", eval_data)
    assert abs(float_base["loss"] - report["base"]["loss"]) > 1e-4


# ---- bad input: one line, an exit code, nothing written -------------------------------------------------


@pytest.fixture(scope="module")
def long_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    path.write_text("".join(json.dumps({"instruction": "word " * 80, "input": "", "output": "ok"}) + "\n"
                            for _ in range(3)))
    return path


@pytest.mark.parametrize("case", ["both", "no-eval-set", "split-too-large", "no-loss-tokens", "bad-split"])
def test_bad_eval_options_fail_cleanly(cli, tmp_path: Path, train_data: Path, eval_data: Path, long_prompts: Path,
                                       case: str) -> None:
    extra, code, words = {
        "both": (["--eval-dataset", eval_data, "--eval-split", "0.1"], 2, "pass one"),
        "no-eval-set": (["--early-stopping-patience", "2", "--load-best"], 2, "need an eval set"),
        "split-too-large": (["--eval-split", "8"], 3, "leaves nothing to train on"),
        "no-loss-tokens": (["--eval-dataset", long_prompts, "--seq-length", "64"], 3, "--eval-dataset: every row"),
        "bad-split": (["--eval-split", "1.5"], 2, "--eval-split"),
    }[case]
    out = tmp_path / "run"
    result = cli("train", "--method", "lora", *TINY, "--dataset", train_data, "--output-dir", out, *extra)
    assert result.exit_code == code, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, code, words", [
    (["/no/such/model", "--dataset", "x.jsonl"], 2, "does not exist"),  # a path typed wrong: a bad argument
    (["builtin:no-such-model", "--dataset", "builtin:alpaca-sample"], 4, "builtin"),
    (["builtin:tiny-llama"], 2, "--dataset"),
])
def test_eval_refuses_unknown_targets(cli, tmp_path: Path, args: list[str], code: int, words: str) -> None:
    result = cli("eval", *args)
    assert result.exit_code == code, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr


def test_eval_of_data_without_loss_tokens_fails_cleanly(cli, long_prompts: Path) -> None:
    result = cli("eval", "builtin:tiny-llama", "--dataset", long_prompts, "--seq-length", "64")
    assert result.exit_code == 3, result.stdout + result.stderr
    assert result.stderr.strip().startswith("error: --dataset: every row") and len(result.stderr.strip().splitlines()) == 1
