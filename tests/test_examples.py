"""The YAML configs in examples/: each loads through the real config loader with known keys only, its values
fit its method, and each kind of run they describe is trained through the real CLI on the built-in tiny model.

    $ python -m pytest -q tests/test_examples.py

A run passes the example file itself (`ftcli train --config examples/X.yaml`) and overrides on the command
line only what cannot run offline on 2 CPU cores: the model and dataset (`builtin:tiny-llama`,
`builtin:alpaca-sample`), the output folder, a 2-step `--max-steps`, and, for the two-machine example, the
machines (one machine, two processes on localhost). Everything else (method, dtype, batch, accumulation,
sequence length, LoRA shape, schedule, eval split, template, checkpointing) is the file's.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_manifest
from ftcli.config import FIELDS, RunConfig, build_run_config, load_config_file, normalize_key

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
NAMES = [p.name for p in EXAMPLES]
TINY = ["--model", "builtin:tiny-llama", "--dataset", "builtin:alpaca-sample"]

# The reference scripts (see docs/training.md "Recipes"): the settings their equivalents must keep.
REFERENCE = {
    "full-llama-3.2-3b.yaml": dict(method="full", model="meta-llama/Llama-3.2-3B-Instruct", batch_size=8,
                                   learning_rate=5e-5, gradient_checkpointing=False),
    "lora-llama-3.1-8b.yaml": dict(method="lora", model="meta-llama/Llama-3.1-8B-Instruct", batch_size=4,
                                   learning_rate=1e-4, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0),
    "fsdp-lora-llama-3.1-70b-two-machines.yaml": dict(method="fsdp", model="meta-llama/Llama-3.1-70B-Instruct",
                                                      batch_size=4, learning_rate=1e-4, gradient_checkpointing=True,
                                                      nnodes=2, nproc_per_node=1, full_parameters=False),
    "qlora-llama-3.1-70b.yaml": dict(method="qlora", model="meta-llama/Llama-3.1-70B-Instruct", batch_size=8,
                                     learning_rate=1e-4, lora_target_modules=["all-linear"],
                                     gradient_checkpointing=False),
}
SMALL_OPEN_MODELS = ("Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct")


def config_of(path: Path) -> RunConfig:
    return build_run_config({}, path)


def test_the_examples_the_docs_promise_exist() -> None:
    assert set(REFERENCE) <= set(NAMES), sorted(set(REFERENCE) - set(NAMES))
    assert "qlora-llama-3.1-70b-one-gpu.yaml" in NAMES and "lora-qwen2.5-0.5b.yaml" in NAMES
    assert {"sft-then-dpo-1-sft.yaml", "sft-then-dpo-2-dpo.yaml"} <= set(NAMES)
    linked = (EXAMPLES_DIR / "README.md").read_text()
    assert [n for n in NAMES if n not in linked] == [], "examples/README.md must list every example"


@pytest.mark.parametrize("path", EXAMPLES, ids=NAMES)
def test_example_loads_with_known_keys_and_says_how_to_run_it(path: Path) -> None:
    raw = load_config_file(path)  # refuses an unknown key, a repeated key, a non-mapping
    assert raw and all(normalize_key(k) in FIELDS for k in raw)
    config = config_of(path)
    # Nothing falls back to a hub default: the model, data and run folder are the file's own.
    assert {"method", "model", "dataset", "output_dir"} <= set(raw), sorted(raw)
    assert config.output_dir.startswith("runs/")
    assert 1e-6 <= config.learning_rate <= 1e-3
    assert config.dtype == "bfloat16"  # every example targets a GPU; the comments say what to change on CPU
    assert f"ftcli train --config examples/{path.name}" in path.read_text(), "the header shows the command"


def test_output_folders_differ() -> None:
    folders = [config_of(p).output_dir for p in EXAMPLES]
    assert len(set(folders)) == len(folders), folders


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_equivalents_keep_the_reference_settings(name: str) -> None:
    config = config_of(EXAMPLES_DIR / name)
    for key, want in REFERENCE[name].items():
        assert getattr(config, key) == want, (key, getattr(config, key), want)
    assert (config.dataset, config.dataset_size, config.seq_length, config.num_epochs, config.seed) == \
        ("tatsu-lab/alpaca", 500, 2048, 1.0, 42)


@pytest.mark.parametrize("path", EXAMPLES, ids=NAMES)
def test_values_fit_the_method(path: Path) -> None:
    config = config_of(path)
    name = path.name
    assert config.method == next(m for m in ("qlora", "fsdp", "full", "lora", "sft-then-dpo") if m in name) \
        .replace("sft-then-dpo", "lora")
    if config.method == "qlora":
        assert config.lora_target_modules == ["all-linear"]  # QLoRA adapts every linear layer
    if config.method == "fsdp":
        assert config.nproc_per_node * config.nnodes > 1, "FSDP on one process shards nothing"
        assert config.node_rank == 0 and config.nnodes == 2 and config.nnodes > config.node_rank
        assert config.master_addr not in ("127.0.0.1", "localhost") or config.rdzv_endpoint, \
            "two machines need an address machine 1 can reach"
        assert "--node-rank 1" in path.read_text(), "the comment says what changes on the second machine"
    else:
        assert config.nproc_per_node == config.nnodes == 1
    if "one-gpu" in name:
        assert config.method == "qlora" and config.gradient_checkpointing and config.batch_size <= 2
        assert config.batch_size * config.gradient_accumulation_steps == REFERENCE["qlora-llama-3.1-70b.yaml"][
            "batch_size"], "the reference run's effective batch"
    if "qwen" in name or "sft-then-dpo" in name:
        assert config.model in SMALL_OPEN_MODELS or config.model.startswith("runs/")


def test_sft_then_dpo_chain() -> None:
    sft, dpo = config_of(EXAMPLES_DIR / "sft-then-dpo-1-sft.yaml"), config_of(EXAMPLES_DIR / "sft-then-dpo-2-dpo.yaml")
    assert (sft.objective, dpo.objective) == ("sft", "dpo")
    assert dpo.model == sft.output_dir, "step 2 continues from step 1's run folder"
    assert dpo.method == sft.method and dpo.learning_rate < sft.learning_rate
    assert "ftcli export runs/dpo" in (EXAMPLES_DIR / "sft-then-dpo-1-sft.yaml").read_text()


# ---- runs: each kind of run the examples describe, once, through the real CLI -------------------------------------

def finished(out: Path, steps: int = 2) -> dict:
    manifest = read_manifest(out)
    assert manifest["status"] == "finished", manifest.get("error")
    seen = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]
    assert len(seen) == steps and all(math.isfinite(x) for x in seen)
    return manifest


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full-llama-3.2-3b.yaml", "lora-qwen2.5-0.5b.yaml",
                                  "qlora-llama-3.1-70b-one-gpu.yaml"])
def test_example_runs_on_the_tiny_model(cli, tmp_path: Path, name: str) -> None:
    """One example per single-process method (the others of the same method differ in numbers only)."""
    out = tmp_path / "run"
    result = cli("train", "--config", EXAMPLES_DIR / name, *TINY, "--max-steps", "2", "--output-dir", out)
    assert result.exit_code == 0, result.output
    manifest = finished(out)
    config = manifest["config"]
    example = config_of(EXAMPLES_DIR / name)
    for key in ("method", "dtype", "batch_size", "gradient_accumulation_steps", "seq_length", "lora_rank",
                "gradient_checkpointing", "template", "eval_split", "lr_scheduler"):
        assert config[key] == getattr(example, key), key  # the file's settings, not defaults


@pytest.mark.slow
def test_sft_then_dpo_examples_run_as_a_chain(cli, tmp_path: Path) -> None:
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    result = cli("train", "--config", EXAMPLES_DIR / "sft-then-dpo-1-sft.yaml", *TINY, "--max-steps", "2",
                 "--output-dir", sft_out)
    assert result.exit_code == 0, result.output
    finished(sft_out)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Add {i} and {i}.", "chosen": f"{2 * i}.",
                                         "rejected": f"{i}{i}."}) + "\n" for i in range(40)))
    result = cli("train", "--config", EXAMPLES_DIR / "sft-then-dpo-2-dpo.yaml", "--model", sft_out,
                 "--dataset", prefs, "--max-steps", "2", "--output-dir", dpo_out)
    assert result.exit_code == 0, result.output
    manifest = finished(dpo_out)
    assert manifest["config"]["objective"] == "dpo"
    assert manifest["resolved"]["chain"], "the DPO run records the SFT run it continues"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_fsdp_two_machine_example_runs_as_two_processes_on_one(tmp_path: Path) -> None:
    """The two-machine file with the machines replaced: 1 machine x 2 processes (gloo), the rest as written."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ftcli", "train", "--config", str(EXAMPLES_DIR / "fsdp-lora-llama-3.1-70b-two-machines.yaml"),
           *TINY, "--max-steps", "2", "--output-dir", str(out), "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = finished(out)
    assert manifest["resolved"]["processes"] == 2 and manifest["config"]["gradient_checkpointing"] is True
