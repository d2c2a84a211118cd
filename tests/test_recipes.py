"""Optimizer, schedule and experiment trackers through the CLI, on the built-in tiny model: every step's logged learning
rate against transformers' own schedules, weight decay and 8-bit AdamW against independent computations, NEFTune,
the resume identity, the one-line refusals, and MLflow's local store read back against metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import losses, read_manifest

from ftcli.errors import EXIT_CONFIG

TINY = ["--model", "builtin:tiny-llama", "--dataset", "builtin:alpaca-sample", "--dataset-size", "12",
        "--batch-size", "2", "--seq-length", "128"]
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None


def train(cli, out: Path, *flags: str, method: str = "lora") -> Path:
    result = cli("train", "--method", method, *TINY, "--output-dir", out, *flags)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return out


def learning_rates(run: Path) -> list[float]:
    return [json.loads(line)["learning_rate"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def transformers_schedule(name: str, steps: int, warmup: int, lr: float, **kwargs) -> list[float]:
    """The learning rate of each optimizer step, from transformers' own get_scheduler."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps,
                              scheduler_specific_kwargs=kwargs)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == EXIT_CONFIG, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in err, (needle, err)
    # Refused before anything loaded: no model line, no run folder.
    assert "model:" not in result.stdout
    return err


# ---- schedules --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cosine with 2 warmup steps over 6 steps, a checkpoint at step 3, reported to TensorBoard and (if installed)
    MLflow, with the trackers given as a repeated flag."""
    from typer.testing import CliRunner

    from ftcli.cli import app

    trackers = ["--report-to", "tensorboard"] + (["--report-to", "mlflow"] if HAS_MLFLOW else [])
    out = tmp_path_factory.mktemp("cosine") / "run"
    args = ["train", "--method", "lora", *TINY, "--output-dir", str(out), "--max-steps", "6", "--learning-rate",
            "1e-3", "--lr-scheduler", "cosine", "--warmup-steps", "2", "--save-steps", "3", *trackers]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return out


def test_cosine_with_warmup_follows_transformers_schedule(cosine_run: Path) -> None:
    got = learning_rates(cosine_run)
    expected = transformers_schedule("cosine", 6, 2, 1e-3)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert got[0] == 0.0 and max(got) == pytest.approx(1e-3)  # the warmup starts at 0 and reaches the peak


@pytest.mark.parametrize("flags, name, warmup, kwargs", [
    # 25% warmup (2 steps), then stable, then 30% (rounded up: 3 steps) of cosine decay down to 10% of the peak.
    (["--max-steps", "8", "--lr-scheduler", "warmup_stable_decay", "--warmup-ratio", "0.25", "--decay-ratio", "0.3",
      "--min-lr-ratio", "0.1"], "warmup_stable_decay", 2, {"num_decay_steps": 3, "min_lr_ratio": 0.1}),
    # The floor defaults to 10% of the peak; a 0.15 warmup ratio rounds up to 1 of 6 steps. (No tracker here.)
    (["--max-steps", "6", "--lr-scheduler", "cosine_with_min_lr", "--warmup-ratio", "0.15", "--report-to", "none",
      "--run-name", "quiet"], "cosine_with_min_lr", 1, {"min_lr_rate": 0.1}),
], ids=["warmup_stable_decay", "cosine_with_min_lr"])
def test_more_schedules_follow_transformers(cli, tmp_path: Path, flags: list[str], name: str, warmup: int,
                                            kwargs: dict) -> None:
    run = train(cli, tmp_path / "run", "--learning-rate", "1e-3", *flags)
    steps = int(flags[1])
    assert learning_rates(run) == pytest.approx(transformers_schedule(name, steps, warmup, 1e-3, **kwargs),
                                                rel=1e-9, abs=1e-15)
    if "--report-to" in flags:  # none: no tracker files, and the run name is recorded
        assert not (run / "logs").exists() and not (run / "mlruns").exists()
        manifest = read_manifest(run)
        assert manifest["config"]["report_to"] == [] and manifest["resolved"]["run_name"] == "quiet"


def test_the_recipe_is_recorded(cosine_run: Path) -> None:
    from ftcli.config import build_run_config

    manifest = read_manifest(cosine_run)
    config = manifest["config"]
    assert (config["optim"], config["lr_scheduler"], config["warmup_steps"], config["weight_decay"],
            config["max_grad_norm"], config["adam_beta2"]) == ("auto", "cosine", 2, 0.0, 1.0, 0.999)
    assert config["report_to"] == (["tensorboard", "mlflow"] if HAS_MLFLOW else ["tensorboard"])
    resolved = manifest["resolved"]
    # auto: the fused AdamW on CPU, as before --optim existed.
    assert resolved["optim"] == "adamw_torch_fused" and resolved["run_name"] == "run"
    assert resolved["trackers"]["tensorboard"] == str(cosine_run / "logs")
    # The copied config reproduces the recipe.
    again = build_run_config({}, config_file=cosine_run / "ftcli_config.yaml")
    assert (again.lr_scheduler, again.warmup_steps, again.report_to) == ("cosine", 2, config["report_to"])
    # The checkpoint's identity holds what is not at its default.
    marker = json.loads((cosine_run / "checkpoint-3" / "ftcli_checkpoint.json").read_text())
    assert marker["run"]["lr_scheduler"] == "cosine" and marker["run"]["warmup_steps"] == 2
    assert "weight_decay" not in marker["run"] and "optim" not in marker["run"]


# ---- trackers ---------------------------------------------------------------------------------------


def test_tensorboard_holds_the_loss_curve(cosine_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cosine_run / "logs"))
    events.Reload()
    curve = events.Scalars("train/loss")
    assert [e.step for e in curve] == list(range(1, len(losses(cosine_run)) + 1))
    assert [e.value for e in curve] == pytest.approx(losses(cosine_run), rel=1e-6)


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow (the test extra's mlflow-skinny) is not installed")
def test_mlflow_store_in_the_run_folder_holds_the_loss_curve(cosine_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the file store needs it too
    uri = f"file:{cosine_run / 'mlruns'}"
    assert read_manifest(cosine_run)["resolved"]["trackers"]["mlflow"] == uri
    client = MlflowClient(uri)
    runs = client.search_runs(experiment_ids=["0"])
    assert len(runs) == 1 and runs[0].info.run_name == "run" and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    curve = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in curve] == list(range(1, len(losses(cosine_run)) + 1))
    assert [m.value for m in curve] == pytest.approx(losses(cosine_run), rel=1e-9)
    rates = [m.value for m in sorted(client.get_metric_history(run_id, "learning_rate"), key=lambda m: m.step)]
    assert rates == pytest.approx(learning_rates(cosine_run), rel=1e-9, abs=1e-15)
    assert runs[0].data.params["lr_scheduler_type"] == "cosine"


# ---- optimizers -------------------------------------------------------------------------------------

ONE_STEP = ["--max-steps", "1", "--learning-rate", "1e-2", "--save-steps", "1"]


@pytest.fixture(scope="module")
def one_step_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """One full fine-tuning step from the same weights, data and seed: AdamW, AdamW with weight decay, 8-bit AdamW
    and AdamW with NEFTune."""
    from typer.testing import CliRunner

    from ftcli.cli import app

    variants = {"adamw": [], "decay": ["--weight-decay", "0.5"], "8bit": ["--optim", "adamw_8bit"],
                "neftune": ["--neftune-noise-alpha", "5"]}
    root = tmp_path_factory.mktemp("one-step")
    runs = {}
    for name, flags in variants.items():
        out = root / name
        result = CliRunner().invoke(app, ["train", "--method", "full", *TINY, "--output-dir", str(out), *ONE_STEP,
                                          *flags], catch_exceptions=False)
        assert result.exit_code == 0, (name, result.stdout, result.stderr)
        runs[name] = out
    runs["base"] = tiny_model_dir
    return runs


def test_weight_decay_is_decoupled_and_spares_norms(one_step_runs: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    base = load_file(str(next(one_step_runs["base"].glob("*.safetensors"))))
    plain, decayed = weights(one_step_runs["adamw"]), weights(one_step_runs["decay"])
    lr, wd = 1e-2, 0.5
    checked = 0
    for name, p0 in base.items():
        diff = decayed[name] - plain[name]
        if "norm" in name:
            assert torch.equal(diff, torch.zeros_like(diff)), name  # norms are never decayed
        else:
            # AdamW: p <- p (1 - lr wd) - lr update; the update is the same from the same gradients.
            torch.testing.assert_close(diff, -lr * wd * p0, rtol=1e-4, atol=1e-7)
            checked += 1
    assert checked >= 7


def test_8bit_adamw_trains_on_cpu_with_8bit_state(one_step_runs: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    assert read_manifest(one_step_runs["8bit"])["resolved"]["optim"] == "adamw_8bit"
    state = torch.load(one_step_runs["8bit"] / "checkpoint-1" / "optimizer.pt", weights_only=True)["state"]
    # bitsandbytes' blockwise 8-bit moments (the trainer keeps embeddings, and bitsandbytes tensors under 4096
    # elements, in 32-bit ones); bitsandbytes nests them in its state dict.
    moments = [s.get("__bnb_optimizer_quant_state__", s)["state1"] for s in state.values()]
    assert {m.dtype for m in moments} == {torch.uint8, torch.float32}
    assert sum(m.numel() for m in moments if m.dtype == torch.uint8) > 50_000
    base = load_file(str(next(one_step_runs["base"].glob("*.safetensors"))))
    plain, eight = weights(one_step_runs["adamw"]), weights(one_step_runs["8bit"])
    differs = 0
    for name, p0 in base.items():
        step32, step8 = plain[name] - p0, eight[name] - p0
        assert step8.abs().max() > 1e-3, name  # it trains every weight
        # The first Adam step is lr * m / sqrt(v) = lr * sign(gradient) in both: the same step, up to the 8-bit
        # optimizer's own arithmetic.
        assert torch.nn.functional.cosine_similarity(step8.flatten(), step32.flatten(), dim=0) > 0.99, name
        differs += not torch.equal(step8, step32)
    assert differs > 0


def test_neftune_changes_the_step(one_step_runs: dict[str, Path]) -> None:
    plain, noisy = one_step_runs["adamw"], one_step_runs["neftune"]
    assert losses(noisy) != losses(plain)  # the noise is in the forward pass of training
    assert read_manifest(noisy)["config"]["neftune_noise_alpha"] == 5.0


# ---- resume identity --------------------------------------------------------------------------------


def test_resume_refuses_another_schedule_or_optimizer(cli, cosine_run: Path, one_step_runs: dict[str, Path]) -> None:
    cosine_flags = ["--max-steps", "6", "--learning-rate", "1e-3", "--save-steps", "3"]
    result = cli("train", "--method", "lora", *TINY, "--output-dir", cosine_run, *cosine_flags,
                 "--lr-scheduler", "linear", "--warmup-steps", "2", "--resume", cosine_run / "checkpoint-3")
    assert result.exit_code == EXIT_CONFIG, (result.stdout, result.stderr)
    assert "lr_scheduler 'cosine' -> 'linear'" in result.stderr and "--force" in result.stderr
    # A checkpoint at the defaults records none of them (like one written before they existed): a setting that
    # differs from its default is refused against it, the defaults resume.
    adamw = one_step_runs["adamw"]
    marker = json.loads((adamw / "checkpoint-1" / "ftcli_checkpoint.json").read_text())["run"]
    assert not {"optim", "lr_scheduler", "weight_decay", "warmup_steps"} & set(marker)
    result = cli("train", "--method", "full", *TINY, "--output-dir", adamw, *ONE_STEP, "--weight-decay", "0.1",
                 "--resume")
    assert result.exit_code == EXIT_CONFIG and "weight_decay 0.0 -> 0.1" in result.stderr, result.stderr
    eight = one_step_runs["8bit"]
    result = cli("train", "--method", "full", *TINY, "--output-dir", eight, "--max-steps", "2", "--learning-rate",
                 "1e-2", "--resume")
    assert result.exit_code == EXIT_CONFIG and "optim 'adamw_8bit' -> 'auto'" in result.stderr, result.stderr


def test_a_checkpoint_at_the_defaults_resumes(cli, tmp_path: Path, one_step_runs: dict[str, Path]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_step_runs["adamw"], run)
    result = cli("train", "--method", "full", *TINY, "--output-dir", run, "--max-steps", "2", "--learning-rate",
                 "1e-2", "--save-steps", "1", "--resume")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---- refusals and help ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, needles", [
    (["--optim", "paged_adamw_8bit"], ["--optim paged_adamw_8bit", "needs CUDA", "--optim adamw_8bit"]),
    (["--optim", "adamw_torch_fusd"], ["--optim adamw_torch_fusd", "did you mean adamw_torch_fused"]),
    (["--optim", "galore_adamw"], ["not supported by ftcli"]),
    (["--report-to", "none,mlflow"], ["--report-to", "'none'"]),
    (["--report-to", "neptune"], ["--report-to", "neptune"]),
    (["--warmup-ratio", "0.1", "--warmup-steps", "3"], ["--warmup-ratio and --warmup-steps"]),
    (["--lr-scheduler", "constant", "--warmup-steps", "2"], ["constant_with_warmup"]),
    (["--lr-scheduler", "cosine", "--decay-ratio", "0.2"], ["--decay-ratio", "warmup_stable_decay"]),
    (["--lr-scheduler", "linear", "--min-lr-ratio", "0.1"], ["--min-lr-ratio"]),
    (["--optim", "sgd", "--adam-beta1", "0.8"], ["--adam-beta1", "--optim sgd"]),
    (["--lr-scheduler", "cosine_restarts"], ["--lr-scheduler"]),
    (["--warmup-ratio", "1.5"], ["--warmup-ratio"]),
], ids=lambda v: "-".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_bad_recipes_are_one_line_before_anything_loads(cli, tmp_path: Path, flags: list[str],
                                                        needles: list[str]) -> None:
    out = tmp_path / "run"
    assert_one_line_error(cli("train", "--method", "full", *TINY, "--output-dir", out, *flags), *needles)
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_missing_tracker_names_its_extra(cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert_one_line_error(cli("train", *TINY, "--output-dir", out, "--report-to", "tensorboard,wandb"),
                          "--report-to wandb", "pip install 'ftcli[wandb]'")
    assert not out.exists()


def test_help_shows_the_recipe_defaults(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("TERMINAL_WIDTH", "250")
    # The box drawing and the wrapping taken out (an earlier test may have fixed the console's width).
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", cli("train", "--help").stdout).split())
    assert "Optimizer and schedule" in text
    for fragment in ("[default: auto]", "[default: linear]", "[default: 0.9]", "[default: 0.999]", "[default: 1e-8]",
                     "[default: 0.1 cosine_with_min_lr, 0 warmup_stable_decay]", "[default: tensorboard]",
                     "[default: the run folder's name]"):
        assert fragment in text, fragment
    assert math.isclose(float(text.split("--max-grad-norm")[1].split("[default: ")[1].split("]")[0]), 1.0)
