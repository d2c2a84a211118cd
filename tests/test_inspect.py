"""`ftcli inspect`: models, adapters, runs and data, checked against the real things they describe.

The memory estimate is checked two ways. Exactly: its activation term against the bytes autograd
saves for the trainer's own loss (full fine-tuning, no checkpointing): within 15% (measured: 6%
over). Against real CPU trainings in subprocesses: the process's own high-water mark (VmHWM, reset
after the imports) minus its RSS after the imports. Not getrusage's ru_maxrss, which a child
started from pytest inherits from it across vfork and exec: inside the full suite it read the
pytest process's peak (about 950 MiB) and the measured saving of gradient checkpointing fell to
0.61x, 0.72x and 0.04x of the estimate on clean clones while it measured 1.0x alone. The measured
processes also fix glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_), so large tensors are mapped and
unmapped and the peak follows the live tensors (identical runs agree within 1 MiB), and the data is
prepared once before them. The memory gradient checkpointing saves is 0.75x to 1.5x the estimated
activation difference (measured 1.00x), and the measured training memory is at least the estimate
and at most the estimate + 400 MiB (the CPU process's own runtime: allocator, thread pools, data
loader, trainer; about 25 MiB here beyond the estimate, not part of a GPU estimate, which models
TRL's fused LM head where the CPU loss keeps the whole logits).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import losses, read_manifest

MiB = 1 << 20
# Large allocations always mapped, freed memory always returned: the peak RSS follows the live tensors.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
TARGETS = ["q_proj", "v_proj", "down_proj"]
MEASURE = """
import json, sys
from ftcli.training.setup import quiet_libraries
quiet_libraries()
import datasets, peft, torch, transformers, trl  # noqa: F401  (the baseline includes the libraries)
from ftcli.cli import app
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
baseline = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the high-water mark back to the current RSS: the peak is the command's alone
except OSError:
    pass  # the peak then also covers the imports, which the baseline already holds
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit as exc:
    assert not exc.code, exc.code
peak = status("VmHWM")
print("MEASURED " + json.dumps({"baseline": baseline, "peak": peak}))
"""


def _make_model(folder: Path) -> Path:
    """A random Llama big enough that tensors dominate the Python baseline (3.8M parameters), tiny's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ftcli.builtin import resolve_builtin_model

    tok = AutoTokenizer.from_pretrained(str(resolve_builtin_model("builtin:tiny-llama")))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two LoRA trainings through the CLI (checkpointing off / on), each in its own measured process."""
    root = tmp_path_factory.mktemp("inspect")
    model = _make_model(root / "model")
    data = root / "long.jsonl"
    words = ("apple", "river", "stone", "cloud", "green", "seven", "table", "music")
    data.write_text("".join(json.dumps({"instruction": f"Write {w} many times.", "input": "",
                                        "output": " ".join([w] * 300)}) + "\n" for w in words))
    common = ["train", "--method", "lora", "--model", str(model), "--dataset", str(data), "--batch-size", "8",
              "--seq-length", "256", "--max-steps", "2", "--lora-rank", "4", "--lora-target-modules",
              ",".join(TARGETS)]
    # The data is prepared once first: both measured runs then load it from the cache (the one that prepared it
    # would otherwise carry the preparation's memory into its peak, and which one does is a race).
    prepared = subprocess.run([sys.executable, "-m", "ftcli", "prepare", *common[1:]], capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    procs = {}
    for name, extra in (("plain", ["--no-gradient-checkpointing"]), ("ckpt", ["--gradient-checkpointing"])):
        procs[name] = subprocess.Popen([sys.executable, "-c", MEASURE, *common, *extra, "--output-dir",
                                        str(root / name)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "COLUMNS": "200", **FIXED_MALLOC})
    measured = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
        line = next(line for line in out.splitlines() if line.startswith("MEASURED "))
        measured[name] = json.loads(line.removeprefix("MEASURED "))
    return {"root": root, "model": model, "data": data, "measured": measured, "plain": root / "plain",
            "ckpt": root / "ckpt"}


def _inspect_json(cli, *args) -> dict:
    result = cli("inspect", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)  # stdout holds one JSON object and nothing else


# ---- models ---------------------------------------------------------------------------------------


def test_model_view_matches_the_real_model(cli, tiny_model_dir: Path, runs: dict) -> None:
    from transformers import AutoModelForCausalLM

    for target, folder in (("builtin:tiny-llama", tiny_model_dir), (str(runs["model"]), runs["model"])):
        report = _inspect_json(cli, target)
        real = AutoModelForCausalLM.from_pretrained(str(folder))
        m = report["model"]
        assert report["kind"] == "model"
        assert m["parameters"] == sum(p.numel() for p in real.parameters())
        assert m["layers"] == real.config.num_hidden_layers and m["hidden_size"] == real.config.hidden_size
        assert m["heads"] == real.config.num_attention_heads and m["kv_heads"] == real.config.num_key_value_heads
        assert m["vocab_size"] == real.config.vocab_size and m["architecture"] == "LlamaForCausalLM"
        assert m["context_length"] == real.config.max_position_embeddings and m["dtype"] == "float32"
        assert m["chat_template"] is True
        assert [e["method"] for e in report["memory"]["methods"]] == ["full", "lora", "qlora", "fsdp"]


def test_model_view_renders_with_rich(cli) -> None:
    result = cli("inspect", "builtin:tiny-llama", "--gpu-memory", "80GB")
    assert result.exit_code == 0, result.stderr
    for text in ("LlamaForCausalLM", "301,120", "chat template", "fits", "qlora"):
        assert text in result.stdout, text


def test_memory_estimate_verdict_and_options(cli) -> None:
    small = _inspect_json(cli, "builtin:tiny-llama", "--seq-length", "256", "--gpu-memory", "2GB")
    assert all(e["fits"] for e in small["memory"]["methods"])
    big = _inspect_json(cli, "builtin:tiny-llama", "--seq-length", "8192", "--batch-size", "64", "--gpu-memory", "2GB",
                        "--no-gradient-checkpointing")
    assert not any(e["fits"] for e in big["memory"]["methods"])
    by = {e["method"]: e for e in big["memory"]["methods"]}
    assert by["full"]["trainable_parameters"] == big["model"]["parameters"]
    assert by["lora"]["trainable_parameters"] < by["full"]["trainable_parameters"]
    # QLoRA keeps embeddings, norms and head in float32 (kbit prep): on this tiny model, whose weights are mostly
    # embeddings, that is more than LoRA's bfloat16 weights and less than the model in float32.
    assert by["lora"]["weights_bytes"] < by["qlora"]["weights_bytes"] < big["model"]["parameters"] * 4
    fsdp = _inspect_json(cli, "builtin:tiny-llama", "--seq-length", "256", "--nproc", "4")
    # Sharding over four processes divides the optimizer state of fsdp only.
    one = {e["method"]: e for e in small["memory"]["methods"]}
    four = {e["method"]: e for e in fsdp["memory"]["methods"]}
    assert four["fsdp"]["optimizer_bytes"] == one["fsdp"]["optimizer_bytes"] // 4
    assert four["lora"]["optimizer_bytes"] == one["lora"]["optimizer_bytes"]
    result = cli("inspect", "builtin:tiny-llama", "--gpu-memory", "lots")
    assert result.exit_code == 2 and "--gpu-memory" in result.stderr


def test_activation_estimate_matches_the_tensors_autograd_saves(runs: dict, tmp_path: Path) -> None:
    """Exact count, no allocator noise: the bytes autograd keeps for the backward pass of the trainer's own
    loss (full fine-tuning, 8 x 256 tokens), against the estimate's per-layer activation term: within 15%."""
    import torch

    from ftcli.config import build_run_config
    from ftcli.data import load_training_dataset
    from ftcli.inspection.estimate import activation_elements_per_token, describe_model
    from ftcli.methods import METHODS
    from ftcli.models import load_model, load_tokenizer
    from ftcli.training.warmup import _warmup_trainer

    config = build_run_config({"method": "full", "model": str(runs["model"]), "dataset": str(runs["data"]),
                               "batch_size": 8, "seq_length": 256})
    tokenizer = load_tokenizer(config.model)
    dataset, _ = load_training_dataset(config, tokenizer)
    plan = METHODS["full"].plan(config, load_model(config.model, dtype="float32", device="cpu"))
    trainer = _warmup_trainer(config, plan, tokenizer, dataset, tmp_path, "cpu")
    batch = next(iter(trainer.get_train_dataloader()))
    assert tuple(batch["input_ids"].shape) == (8, 256)
    weights = {p.untyped_storage().data_ptr() for p in plan.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    plan.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.compute_loss(plan.model, dict(batch))
    estimated = activation_elements_per_token(describe_model(config.model), False) * 8 * 256 * 4
    assert abs(sum(saved.values()) - estimated) <= 0.15 * estimated, (sum(saved.values()) / MiB, estimated / MiB)


def test_memory_estimate_against_measured_cpu_peaks(runs: dict) -> None:
    """Whole-process CPU peaks (see the module docstring for the tolerance and why)."""
    from ftcli.inspection.estimate import describe_model, estimate_memory

    info = describe_model(str(runs["model"]))
    measured = {k: v["peak"] - v["baseline"] for k, v in runs["measured"].items()}
    est = {name: estimate_memory(info, "lora", batch_size=8, seq_length=256, gradient_checkpointing=name == "ckpt",
                                 dtype="float32", lora_rank=4, lora_targets=TARGETS)
           for name in ("plain", "ckpt")}
    activation_gap = est["plain"].activations_bytes - est["ckpt"].activations_bytes
    measured_gap = measured["plain"] - measured["ckpt"]
    assert 0.75 * activation_gap <= measured_gap <= 1.5 * activation_gap, (measured_gap / MiB, activation_gap / MiB)
    for name in ("plain", "ckpt"):
        total = est[name].total_bytes
        assert total <= measured[name] <= total + 400 * MiB, (name, measured[name] / MiB, total / MiB)


# ---- adapters and runs ----------------------------------------------------------------------------


def test_adapter_view_matches_what_was_trained(cli, runs: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(runs["plain"] / name, adapter / name)
    report = _inspect_json(cli, adapter)
    a = report["adapter"]
    assert report["kind"] == "adapter"
    assert a["rank"] == 4 and a["alpha"] == 16
    assert a["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert Path(a["base_model"]) == runs["model"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert a["trainable_parameters"] == sum(t.numel() for t in tensors.values())
    assert a["trainable_parameters"] == read_manifest(runs["plain"])["resolved"]["trainable_parameters"]
    assert a["size_bytes"] == sum(p.stat().st_size for p in adapter.iterdir())
    result = cli("inspect", adapter)
    assert result.exit_code == 0 and "q_proj" in result.stdout and "rank" in result.stdout


def test_run_view(cli, runs: dict) -> None:
    run = runs["plain"]
    (run / "checkpoint-5").mkdir(exist_ok=True)
    (run / "checkpoint-5" / "ftcli_checkpoint.json").write_text("{}")
    (run / "checkpoint-7").mkdir(exist_ok=True)
    report = _inspect_json(cli, run)
    assert report["kind"] == "run"
    assert report["run"]["status"] == "finished" and report["run"]["metrics"]["steps"] == 2
    assert report["config"]["lora_rank"] == 4 and report["config"]["seq_length"] == 256
    checkpoints = {c["name"]: c["complete"] for c in report["checkpoints"]}
    # A marker that lists no files is no marker (the rule resume uses): both are incomplete.
    assert checkpoints["checkpoint-5"] is False and checkpoints["checkpoint-7"] is False
    curve = report["loss_curve"]
    assert curve["source"] == "tensorboard" and curve["steps"] == [1, 2]
    assert curve["loss"] == pytest.approx(losses(run), rel=1e-5)
    assert report["adapter"]["rank"] == 4
    result = cli("inspect", run)
    assert result.exit_code == 0
    shown = " ".join(result.stdout.replace("│", " ").split())  # table cells wrap at 80 columns
    for text in ("finished", "training loss", "checkpoint-5 (incomplete), checkpoint-7 (incomplete)",
                 "resolved config"):
        assert text in shown, text


def test_run_view_calls_a_checkpoint_complete_by_the_rule_resume_uses(cli, small_alpaca: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = ["train", "--method", "lora", "--model", "builtin:tiny-llama", "--dataset", small_alpaca,
             "--batch-size", "4", "--max-steps", "2", "--save-steps", "1", "--output-dir", run]
    assert cli(*flags).exit_code == 0
    assert {c["name"]: c["complete"] for c in _inspect_json(cli, run)["checkpoints"]} == \
        {"checkpoint-1": True, "checkpoint-2": True}
    # The marker is there, but a file it lists no longer has its recorded size (a cut-off copy, say).
    with open(run / "checkpoint-1" / "adapter_model.safetensors", "ab") as fh:
        fh.write(b"\0")
    assert {c["name"]: c["complete"] for c in _inspect_json(cli, run)["checkpoints"]} == \
        {"checkpoint-1": False, "checkpoint-2": True}
    resumed = cli(*flags, "--resume", run / "checkpoint-1")
    assert resumed.exit_code == 2 and "is not a complete checkpoint" in resumed.stderr


def test_run_view_falls_back_to_metrics_and_shows_failures(cli, runs: dict, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(runs["ckpt"], run)
    shutil.rmtree(run / "logs")
    manifest = read_manifest(run)
    manifest.update(status="interrupted", error="stopped by the user")
    manifest["resolved"]["log_dir"] = str(run / "logs")
    (run / "ftcli_run.json").write_text(json.dumps(manifest))
    report = _inspect_json(cli, run)
    assert report["run"]["status"] == "interrupted"
    assert report["loss_curve"]["source"] == "metrics.jsonl" and len(report["loss_curve"]["loss"]) == 2


# ---- data -----------------------------------------------------------------------------------------


def test_dataset_file_view_and_the_prepared_folder_it_leaves(cli, small_alpaca: Path) -> None:
    from conftest import SMALL_ALPACA_ROWS

    report = _inspect_json(cli, small_alpaca, "--seq-length", "64", "--example", "1")
    d = report["data"]
    assert report["kind"] == "dataset" and d["format"] == "alpaca" and d["rows"] == d["rows_read"] == 8
    lengths = d["length"]
    assert lengths["min"] <= lengths["p50"] <= lengths["p90"] <= lengths["p99"] <= lengths["max"] <= 64
    assert 0 < d["loss_tokens"] < d["tokens"]
    example = report["example"]
    loss_text = "".join(p["text"] for p in example["pieces"] if p["loss"])
    prompt_text = "".join(p["text"] for p in example["pieces"] if not p["loss"])
    outputs = {r["output"] for r in SMALL_ALPACA_ROWS}
    assert loss_text.endswith("</s>") and loss_text.removesuffix("</s>").strip() in outputs, loss_text
    assert "### Instruction:" in prompt_text and "### Response:" in prompt_text
    assert example["loss_tokens"] == sum(p["loss"] for p in example["pieces"])

    # The prepared folder it left behind is a target of its own, with the same numbers; its rows are shuffled
    # (the file's row 1 is at prepared_row there).
    assert example["source_row"] == 1
    prepared = _inspect_json(cli, d["prepared_folder"], "--example", str(example["prepared_row"]))
    assert prepared["kind"] == "prepared"
    assert prepared["data"]["rows"] == 8 and prepared["data"]["length"] == lengths
    assert prepared["example"]["pieces"] == example["pieces"]

    truncated = _inspect_json(cli, "builtin:alpaca-sample", "--seq-length", "128")["data"]
    assert truncated["truncated"] > 0 and truncated["length"]["max"] == 128 and truncated["rows"] == 400

    result = cli("inspect", "builtin:alpaca-sample", "--seq-length", "128")
    assert result.exit_code == 0, result.stderr
    for text in ("400 kept of 400 read", "p50", "truncated", "in the loss", "### Response:"):
        assert text in result.stdout, text


def test_a_text_file_is_inspected_as_train_reads_it(cli, tmp_path: Path) -> None:
    lines = ["The river runs to the sea.", "", "Stones stay where they are.", "Clouds move on."]
    data = tmp_path / "notes.txt"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = _inspect_json(cli, data)
    assert report["kind"] == "dataset" and report["data"]["format"] == "text"
    assert report["data"]["rows"] == report["data"]["rows_read"] == 3  # one example per non-blank line
    shown = {"".join(p["text"] for p in _inspect_json(cli, data, "--example", str(i))["example"]["pieces"])
             for i in range(3)}
    assert shown == {f"<s>{line}</s>" for line in lines if line}  # the whole text is trained, EOS once


def test_broken_dataset_targets(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{not json\n')
    _one_line_error(cli("inspect", bad), 3, "bad.jsonl")
    half = tmp_path / "half"
    half.mkdir()
    (half / "ftcli_prepared.json").write_text(json.dumps({"complete": False}))
    _one_line_error(cli("inspect", half), 3, "incomplete")


# ---- errors ---------------------------------------------------------------------------------------


def _one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_unknown_and_unreadable_targets(cli, tmp_path: Path) -> None:
    _one_line_error(cli("inspect", tmp_path / "missing"), 2, "does not exist")
    _one_line_error(cli("inspect", "./nope.jsonl"), 2, "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(cli("inspect", tmp_path / "empty"), 2, "cannot tell what")
    (tmp_path / "notes.md").write_text("hello")  # .txt is data (as for train); other suffixes are not
    _one_line_error(cli("inspect", tmp_path / "notes.md"), 2, "cannot tell what")
    _one_line_error(cli("inspect", "someone/not-downloaded"), 4, "someone/not-downloaded")
    _one_line_error(cli("inspect", "builtin:gpt-17"), 4, "builtin")
    broken_run = tmp_path / "run"
    broken_run.mkdir()
    (broken_run / "ftcli_run.json").write_text("{not json")
    _one_line_error(cli("inspect", broken_run), 4, "ftcli_run.json")
    broken_adapter = tmp_path / "adapter"
    broken_adapter.mkdir()
    (broken_adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    (broken_adapter / "adapter_model.safetensors").write_bytes(b"garbage")
    _one_line_error(cli("inspect", broken_adapter), 4, "adapter_model.safetensors")
    bad_model = tmp_path / "model"
    bad_model.mkdir()
    (bad_model / "config.json").write_text("{broken")
    _one_line_error(cli("inspect", bad_model), 4, "model")
