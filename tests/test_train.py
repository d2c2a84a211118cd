"""`ftcli train` end to end on the built-in tiny model, on CPU, through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import losses, probe_logits_of, read_manifest

TINY = ["--model", "builtin:tiny-llama"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, small_alpaca_module) -> Path:
    from typer.testing import CliRunner

    from ftcli.cli import app

    out = tmp_path_factory.mktemp("runs") / "full"
    result = CliRunner().invoke(app, ["train", "--method", "full", *TINY, "--dataset", str(small_alpaca_module),
                                      "--max-steps", "40", "--learning-rate", "3e-3", "--batch-size", "4",
                                      "--output-dir", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def small_alpaca_module(tmp_path_factory) -> Path:
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"}
            for w in ("apple", "river", "stone", "cloud", "green", "seven", "table", "music")]
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_full_run_learns(full_run: Path) -> None:
    seen = losses(full_run)
    assert len(seen) == 40
    assert seen[-1] < 0.5 * seen[0], f"loss went {seen[0]:.3f} -> {seen[-1]:.3f}"
    manifest = read_manifest(full_run)
    assert manifest["status"] == "finished"
    assert manifest["metrics"]["steps"] == 40
    assert manifest["metrics"]["real_tokens_per_second"] > 0
    assert manifest["metrics"]["peak_memory_bytes"] > 0
    assert manifest["data"]["eos_trained_once"] == manifest["data"]["rows_used"] == 8


def test_full_run_folder_reloads_with_plain_transformers(full_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(full_run))
    got, saved = probe_logits_of(model, full_run)
    assert torch.allclose(got, saved, atol=1e-5), (got - saved).abs().max()
    tok = AutoTokenizer.from_pretrained(str(full_run))
    assert tok.chat_template and tok.eos_token == "</s>"
    assert not (full_run / "training_args.bin").exists()
    assert not list(full_run.glob("*.bin")) and not list(full_run.glob("*.pt"))


def test_run_folder_manifest_and_logs(full_run: Path) -> None:
    manifest = read_manifest(full_run)
    assert manifest["config"]["method"] == "full"
    assert manifest["config"]["learning_rate"] == 3e-3
    assert manifest["resolved"]["dtype"] == "float32" and manifest["resolved"]["device"] == "cpu"
    assert manifest["resolved"]["attn_implementation"] == "sdpa"
    assert manifest["data"]["fingerprint"].startswith("sha256:")
    for lib in ("torch", "transformers", "trl", "peft"):
        assert manifest["versions"][lib] != "not installed"
    assert set(manifest["timings"]) == {"load_s", "train_s", "save_s", "total_s"}
    assert [r["step"] for r in manifest["log_history"]] == list(range(1, 41))
    events = list((full_run / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard events"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 40


def test_config_copy_reproduces_the_run(full_run: Path, cli, tmp_path: Path) -> None:
    """`ftcli_config.yaml` holds the resolved config: feeding it back gives the same per-step losses."""
    again = tmp_path / "again"
    result = cli("train", "--config", full_run / "ftcli_config.yaml", "--output-dir", again)
    assert result.exit_code == 0, result.stderr
    assert losses(again) == pytest.approx(losses(full_run), abs=1e-6)


def test_lora_run_saves_an_adapter_that_reloads_with_peft(cli, tmp_path: Path, small_alpaca: Path,
                                                          tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    result = cli("train", "--method", "lora", *TINY, "--dataset", small_alpaca, "--max-steps", "30",
                 "--learning-rate", "1e-2", "--lora-rank", "8", "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    seen = losses(out)
    assert seen[-1] < 0.7 * seen[0], f"loss went {seen[0]:.3f} -> {seen[-1]:.3f}"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert sorted(adapter_config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    manifest = read_manifest(out)
    assert manifest["resolved"]["saves"] == "adapter"
    assert 0 < manifest["resolved"]["trainable_parameters"] < manifest["resolved"]["total_parameters"] / 5

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, str(out))
    got, saved = probe_logits_of(model, out)
    assert torch.allclose(got, saved, atol=1e-5), (got - saved).abs().max()
    plain, _ = probe_logits_of(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), out)
    assert not torch.allclose(plain, saved, atol=1e-3), "the adapter changed nothing"


def test_config_file_precedence_and_unknown_key(cli, tmp_path: Path, small_alpaca: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"method: lora\nmodel: builtin:tiny-llama\ndataset: {small_alpaca}\nmax-steps: 5\n"
                   "learning_rate: 2.0e-3\nlora_rank: 4\nlogging_steps: 1\n")
    out = tmp_path / "run"
    result = cli("train", "--config", cfg, "--max-steps", "3", "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(out)
    assert manifest["metrics"]["steps"] == 3  # the flag beat the file
    assert manifest["config"]["learning_rate"] == 2e-3 and manifest["config"]["lora_rank"] == 4  # from the file
    assert manifest["config"]["batch_size"] == 4  # the method's reference default

    cfg.write_text("method: lora\nlearning_rat: 1e-4\n")
    result = cli("train", "--config", cfg, "--output-dir", tmp_path / "other")
    assert result.exit_code == 2
    assert "unknown key 'learning_rat'" in result.stderr and "did you mean 'learning_rate'" in result.stderr
    assert not (tmp_path / "other").exists()


def test_custom_log_dir_and_overwrite(cli, tmp_path: Path, small_alpaca: Path) -> None:
    out, logs = tmp_path / "run", tmp_path / "tb"
    out.mkdir()
    (out / "old.txt").write_text("stale")
    (out / "ftcli_run.json").write_text("{}")  # --overwrite replaces only an ftcli run folder
    result = cli("train", "--method", "lora", *TINY, "--dataset", small_alpaca, "--max-steps", "2",
                 "--log-dir", logs, "--output-dir", out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert not (out / "old.txt").exists()
    assert list(logs.rglob("events.out.tfevents.*")) and not (out / "logs").exists()
    assert "train_samples_per_second" in result.stdout and "real tokens/s" in result.stdout


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses(cli, tmp_path: Path, small_alpaca: Path, method: str) -> None:
    common = ["train", "--method", method, *TINY, "--dataset", small_alpaca, "--max-steps", "4",
              "--learning-rate", "1e-2"]
    assert cli(*common, "--output-dir", tmp_path / "plain").exit_code == 0
    result = cli(*common, "--gradient-checkpointing", "--output-dir", tmp_path / "ckpt")
    assert result.exit_code == 0, result.stderr
    assert read_manifest(tmp_path / "ckpt")["config"]["gradient_checkpointing"] is True
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)


def test_compile_trains_and_saves_loadable_weights(cli, tmp_path: Path, small_alpaca: Path) -> None:
    """--compile compiles in the real run (no throw-away training) and the saved model has plain weight names."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "compiled"
    result = cli("train", "--method", "full", *TINY, "--dataset", small_alpaca, "--max-steps", "2",
                 "--batch-size", "8", "--compile", "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    assert read_manifest(out)["metrics"]["steps"] == 2
    model = AutoModelForCausalLM.from_pretrained(str(out))
    got, saved = probe_logits_of(model, out)
    assert torch.allclose(got, saved, atol=1e-4), (got - saved).abs().max()


def test_failed_run_is_recorded(cli, tmp_path: Path, small_alpaca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash inside training exits 1 with one line, and the manifest says failed (not finished)."""
    from trl import SFTTrainer

    def boom(self, *args, **kwargs):
        raise RuntimeError("simulated crash in step 1")

    monkeypatch.setattr(SFTTrainer, "train", boom)
    out = tmp_path / "run"
    result = cli("train", "--method", "lora", *TINY, "--dataset", small_alpaca, "--output-dir", out)
    assert result.exit_code == 1
    assert "simulated crash in step 1" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    manifest = read_manifest(out)
    assert manifest["status"] == "failed" and "simulated crash" in manifest["error"]
    assert not (out / "adapter_model.safetensors").exists()


def test_dataset_size_defaults_to_every_row_and_the_data_line_says_so(cli, tmp_path: Path) -> None:
    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i}"} for i in range(620)]
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = ["train", "--method", "lora", *TINY, "--dataset", data, "--max-steps", "1", "--seq-length", "64"]
    every = cli(*common, "--output-dir", tmp_path / "every")
    assert every.exit_code == 0, every.stderr
    assert "620 rows read, all of them selected, 620 examples used" in " ".join(every.stdout.split())
    manifest = read_manifest(tmp_path / "every")
    assert manifest["config"]["dataset_size"] is None and manifest["data"]["rows_used"] == 620
    some = cli(*common, "--dataset-size", "500", "--output-dir", tmp_path / "some")
    assert "620 rows read, the first 500 selected, 500 examples used" in " ".join(some.stdout.split())
    assert read_manifest(tmp_path / "some")["data"]["rows_used"] == 500
    (tmp_path / "run.yaml").write_text("dataset_size: all\n")
    assert cli(*common, "--dataset-size", "all", "--output-dir", tmp_path / "all").exit_code == 0
    assert read_manifest(tmp_path / "all")["data"]["rows_used"] == 620
    bad = cli(*common, "--dataset-size", "many", "--output-dir", tmp_path / "bad")
    assert bad.exit_code == 2 and "--dataset-size: must be a number of rows or 'all'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    from ftcli.config import build_run_config

    assert build_run_config({}, config_file=tmp_path / "run.yaml").dataset_size is None


def test_pad_policy_records_what_was_done(cli, tmp_path: Path, tiny_model_dir: Path, small_alpaca: Path) -> None:
    """A tokenizer without a pad token gets pad = EOS, and the manifest says so (it once said "own pad token")."""
    no_pad = tmp_path / "no-pad"
    shutil.copytree(tiny_model_dir, no_pad)
    settings = json.loads((no_pad / "tokenizer_config.json").read_text())
    settings.pop("pad_token")
    (no_pad / "tokenizer_config.json").write_text(json.dumps(settings))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(no_pad)).pad_token is None  # the copy really has none
    for model, expected in ((no_pad, "pad = eos (masked by position)"), ("builtin:tiny-llama", "own pad token")):
        out = tmp_path / f"run-{expected[:3]}"
        result = cli("train", "--method", "full", "--model", model, "--dataset", small_alpaca, "--max-steps", "1",
                     "--output-dir", out)
        assert result.exit_code == 0, result.stderr
        assert read_manifest(out)["resolved"]["pad_policy"] == expected
