"""`ftcli export` end to end: real LoRA, QLoRA and full runs of the built-in tiny model, merged, verified, reloaded.

    $ /work/venv/bin/python -m pytest -q tests/test_export.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_manifest, write_small_alpaca

TINY = ["--model", "builtin:tiny-llama"]
HEAVY = ["torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate"]


def train(root: Path, method: str, *extra: str) -> Path:
    from typer.testing import CliRunner

    from ftcli.cli import app

    data = write_small_alpaca(root / "small.jsonl")
    out = root / f"run-{method}"
    result = CliRunner().invoke(app, ["train", "--method", method, *TINY, "--dataset", str(data),
                                      "--output-dir", str(out), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    # A high learning rate so the adapter clearly moves the logits (B starts at zero).
    return train(tmp_path_factory.mktemp("lora"), "lora", "--max-steps", "8", "--learning-rate", "1e-2")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("qlora"), "qlora", "--max-steps", "8", "--learning-rate", "1e-2")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("full"), "full", "--max-steps", "5", "--learning-rate", "3e-3")


@pytest.fixture(scope="module")
def lora_export(lora_run: Path, tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, str, bool]:
    """(the exported folder, its console output, whether the base model's weights file stayed byte-identical)."""
    from typer.testing import CliRunner

    from ftcli.cli import app

    out = tmp_path_factory.mktemp("exports") / "lora-merged"
    before = sha256(tiny_model_dir / "model.safetensors")
    result = CliRunner().invoke(app, ["export", str(lora_run), "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    return out, flat(result.stdout), sha256(tiny_model_dir / "model.safetensors") == before


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flat(text: str) -> str:
    """Console output with Rich's line wrapping undone."""
    return " ".join(text.split())


def probe_ids(run_dir: Path) -> torch.Tensor:
    return load_file(str(run_dir / "probe.safetensors"))["input_ids"]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()


def adapter_logits(base_dir: Path, run_dir: Path, ids: torch.Tensor, four_bit: bool = False):
    """(logits of base + adapter, logits of the base alone), computed here with peft, independently of export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftcli.methods.qlora import keep_cpu_inference_in_compute_dtype

    kwargs = {}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, device_map={"": "cpu"}, **kwargs)
    model = PeftModel.from_pretrained(base, str(run_dir))
    keep_cpu_inference_in_compute_dtype(model)
    with_adapter = logits(model, ids)
    with model.disable_adapter():
        without = logits(model, ids)
    return with_adapter, without


def reload_without_peft(folders: list[Path], ids: torch.Tensor, tmp_path: Path) -> list[tuple[torch.Tensor, dict]]:
    """Load each exported folder in one fresh process where `import peft` fails: (logits on `ids`, facts) each."""
    ids_file = tmp_path / "ids.safetensors"
    save_file({"input_ids": ids}, str(ids_file))
    script = f"""
import json, sys
sys.modules["peft"] = None  # any attempt to import peft now fails
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
ids = load_file({str(ids_file)!r})["input_ids"]
for i, folder in enumerate({[str(f) for f in folders]!r}):
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        out = model(input_ids=ids[None]).logits[0].float()
    save_file({{"logits": out.contiguous()}}, folder + ".logits.safetensors")
    linear = sorted({{type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}})
    print("FACTS " + json.dumps({{"dtype": str(model.dtype), "chat_template": bool(tok.chat_template),
                                  "linear": linear, "peft": sys.modules.get("peft") is not None}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    facts = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("FACTS ")]
    return [(load_file(f"{folder}.logits.safetensors")["logits"], fact) for folder, fact in zip(folders, facts,
                                                                                                strict=True)]


def tensor_dtypes(folder: Path) -> dict[str, set[str]]:
    """Per safetensors file, the dtypes its header records."""
    found = {}
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        found[file.name] = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.ftcli-*"))


def test_lora_export_matches_the_adapter_and_reloads_without_peft(lora_run: Path, lora_export, tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    out, stdout, base_untouched = lora_export
    # The merge writes into the loaded (memory-mapped, copy-on-write) weights, never into the base's files.
    assert base_untouched
    assert "verify: largest logit difference vs base + adapter" in stdout
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md", "ftcli_export.json"} <= names
    assert not {"adapter_config.json", "adapter_model.safetensors"} & names
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert tensor_dtypes(out) == {"model.safetensors": {"F32"}}  # the base model's own dtype
    assert not leftovers(out)

    ids = probe_ids(lora_run)
    expected, base_only = adapter_logits(tiny_model_dir, lora_run, ids)
    # The adapter really matters: a merge that dropped it would land on `base_only`.
    assert (expected - base_only).abs().max() > 0.5
    [(got, facts)] = reload_without_peft([out], ids, tmp_path)
    assert facts == {"dtype": "torch.float32", "chat_template": True, "linear": ["Linear"], "peft": False}
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_model_card_and_record_say_how_it_was_trained(lora_run: Path, lora_export) -> None:
    out = lora_export[0]
    card = (out / "README.md").read_text()
    manifest = read_manifest(lora_run)
    for fact in ("library_name: transformers", "| method | lora |", "`builtin:tiny-llama`", "| learning rate | 0.01 |",
                 "| steps | 8 ", "r=8, alpha=16", "small.jsonl", manifest["data"]["fingerprint"],
                 f"{manifest['metrics']['train_loss']:.4f}", "ftcli 0.1.0", "the base model's original weights"):
        assert fact in card, fact
    record = json.loads((out / "ftcli_export.json").read_text())
    assert record["merge_into"] == "original" and record["dtype"] == "float32"
    assert record["verification"]["passed"] is True
    assert record["verification"]["max_logit_difference"] < 1e-4 < 0.5 < record["verification"]["adapter_effect"]
    assert record["run"]["config"]["method"] == "lora"


def test_qlora_merges_into_the_dequantized_4bit_base(qlora_run: Path, cli, tiny_model_dir: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "qlora-merged"
    result = cli("export", qlora_run, "--output", out)
    assert result.exit_code == 0, result.stderr
    assert "merge into dequantized weights" in flat(result.stdout)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    ids = probe_ids(qlora_run)
    expected, base_only = adapter_logits(tiny_model_dir, qlora_run, ids, four_bit=True)
    assert (expected - base_only).abs().max() > 0.5
    # The other way in: the original float weights + the adapter (what peft's usual merge gives).
    original = tmp_path / "qlora-original"
    result = cli("export", qlora_run, "--output", original, "--merge-into", "original")
    assert result.exit_code == 0, result.stderr
    assert "trained against the 4-bit weights" in flat(result.stdout)

    (got, facts), (got_original, _) = reload_without_peft([out, original], ids, tmp_path)
    assert facts["linear"] == ["Linear"] and facts["dtype"] == "torch.float32"  # no bitsandbytes layer left
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    expected_original, _ = adapter_logits(tiny_model_dir, qlora_run, ids)
    assert torch.allclose(got_original, expected_original, atol=1e-4)
    # ... which is a different model from the one trained: the 4-bit rounding is gone.
    assert (got_original - got).abs().max() > 1e-2


def test_merging_into_still_quantized_weights_is_refused(qlora_run: Path, cli, tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = cli("export", qlora_run, "--output", out, "--merge-into", "quantized")
    assert result.exit_code == 2
    assert "merging into weights that stay quantised is refused" in flat(result.stderr)
    assert not out.exists() and not leftovers(out)


def test_dtype_and_shard_size_are_honoured(lora_run: Path, lora_export, cli, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    result = cli("export", lora_run, "--output", out, "--dtype", "bfloat16", "--max-shard-size", "200KB")
    assert result.exit_code == 0, result.stderr
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").exists()
    assert all(dtypes == {"BF16"} for dtypes in tensor_dtypes(out).values())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in shards:
        # A shard only exceeds the limit when it holds a single tensor bigger than the limit.
        in_shard = [k for k, v in index["weight_map"].items() if v == shard.name]
        assert shard.stat().st_size <= 200_000 * 1.05 or len(in_shard) == 1, (shard.name, shard.stat().st_size)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    ids = probe_ids(lora_run)
    (got, facts), (full_precision, _) = reload_without_peft([out, lora_export[0]], ids, tmp_path)
    assert facts["dtype"] == "torch.bfloat16"
    difference = (got - full_precision).abs().max()
    assert 0 < difference < 0.05 * full_precision.abs().max()


def test_full_fine_tune_is_resaved(full_run: Path, cli, tmp_path: Path) -> None:
    out = tmp_path / "full-bf16"
    result = cli("export", full_run, "--output", out, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    assert "verify: largest logit difference vs the run's probe logits" in flat(result.stdout)
    assert tensor_dtypes(out) == {"model.safetensors": {"BF16"}}
    # The float32 checkpoint is cast tensor by tensor before loading: every weight is exactly its bfloat16 cast.
    trained, exported = load_file(str(full_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert trained["lm_head.weight"].dtype == torch.float32
    assert exported.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
    assert not any(p.name.startswith(".") for p in out.iterdir())  # the cast copy is gone
    assert "| method | full |" in (out / "README.md").read_text()
    [(got, _)] = reload_without_peft([out], probe_ids(full_run), tmp_path)
    saved = load_file(str(full_run / "probe.safetensors"))["logits"]
    assert torch.allclose(got, saved, atol=0.05 * float(saved.abs().max()))

    refused = cli("export", full_run, "--output", tmp_path / "x", "--merge-into", "original")
    assert refused.exit_code == 2 and "nothing to merge" in flat(refused.stderr)


def test_non_empty_output_is_refused_and_overwrite_replaces_it(lora_run: Path, cli, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("export", lora_run, "--output", out)
    assert result.exit_code == 5
    assert "not empty" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    # --overwrite replaces only a folder ftcli exported: this one is the user's, and stays as it is.
    result = cli("export", lora_run, "--output", out, "--overwrite")
    assert result.exit_code == 5 and "not an ftcli export" in flat(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not leftovers(out)

    out = tmp_path / "exported"
    assert cli("export", lora_run, "--output", out).exit_code == 0
    (out / "extra.txt").write_text("from the previous export")
    result = cli("export", lora_run, "--output", out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert not (out / "extra.txt").exists() and (out / "model.safetensors").exists()
    assert not leftovers(out)

    # --overwrite never replaces the folder being exported.
    result = cli("export", lora_run, "--output", lora_run, "--overwrite")
    assert result.exit_code == 5 and "overlaps" in flat(result.stderr)
    assert (lora_run / "adapter_model.safetensors").exists()


def test_a_failure_part_way_leaves_no_folder(lora_run: Path, cli, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import ftcli.export.run

    def fail(*args, **kwargs):
        raise OSError("disk full")  # after the shards and the tokenizer are written

    monkeypatch.setattr(ftcli.export.run, "write_model_card", fail)
    out = tmp_path / "broken"
    with pytest.raises(OSError, match="disk full"):
        cli("export", lora_run, "--output", out)
    assert not out.exists() and not leftovers(out)

    # With --overwrite, the existing export survives a failed export untouched.
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    (out / "ftcli_export.json").write_text("{}")
    with pytest.raises(OSError):
        cli("export", lora_run, "--output", out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["ftcli_export.json", "old.txt"] and not leftovers(out)

    def terminate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # ends the export like Ctrl-C: exit 130, temp folder removed

    monkeypatch.setattr(ftcli.export.run, "write_model_card", terminate)
    handler = signal.getsignal(signal.SIGTERM)
    result = cli("export", lora_run, "--output", tmp_path / "stopped")
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert not (tmp_path / "stopped").exists() and not leftovers(tmp_path / "stopped")
    assert signal.getsignal(signal.SIGTERM) == handler  # the export put the old handler back


def test_a_killed_export_leaves_no_folder_and_its_temp_folder_is_cleaned(lora_run: Path, cli, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    script = f"""
import os, signal, sys
import ftcli.export.run
from ftcli.cli import app
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup can run: like a power cut or the OOM killer
ftcli.export.run.write_model_card = die
app(["export", {str(lora_run)!r}, "--output", {str(out)!r}])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    stale = [p for p in leftovers(out) if p.is_dir()]  # (and its lock file, which binds nobody once it died)
    assert len(stale) == 1 and (stale[0] / "model.safetensors").exists()  # it was killed part-way

    # A temp folder of an export that still runs is never touched.
    alive = tmp_path / f".killed.ftcli-export.{os.uname().nodename}.{os.getppid()}.1"
    alive.mkdir()
    result = cli("export", lora_run, "--output", out)
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    assert leftovers(out) == [alive]


def test_verification_failure_and_no_verify(lora_run: Path, cli, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import ftcli.export.merge

    monkeypatch.setitem(ftcli.export.merge.RELATIVE_TOLERANCE, "float32", -1.0)  # nothing can pass
    out = tmp_path / "unverified"
    result = cli("export", lora_run, "--output", out)
    assert result.exit_code == 1
    assert "verification failed" in flat(result.stderr) and "nothing was written" in flat(result.stderr)
    assert not out.exists() and not leftovers(out)

    result = cli("export", lora_run, "--output", out, "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert "verify:" not in result.stdout and (out / "model.safetensors").exists()


def test_bare_adapter_folder_base_from_its_config_or_base_flag(lora_run: Path, cli, tmp_path: Path,
                                                               tiny_model_dir: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(lora_run / name, adapter / name)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    result = cli("export", adapter, "--output", tmp_path / "a")
    assert result.exit_code == 4
    assert "base model of" in result.stderr and "--base" in flat(result.stderr)
    assert not (tmp_path / "a").exists()

    result = cli("export", adapter, "--output", tmp_path / "a", "--base", tiny_model_dir)
    assert result.exit_code == 0, result.stderr
    assert "if this adapter was trained with QLoRA" in flat(result.stdout)
    card = (tmp_path / "a" / "README.md").read_text()
    assert "without an ftcli run manifest" in card and "r=8" in card

    # A broken adapter (NaN in a B matrix): refused, nothing written.
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    result = cli("export", adapter, "--output", tmp_path / "nan", "--base", tiny_model_dir)
    assert result.exit_code == 1 and "non-finite" in result.stderr
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize("case", ["missing", "file", "plain-folder", "unfinished", "bad-dtype"])
def test_user_errors_are_one_line_with_an_exit_code(case: str, lora_run: Path, cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    source, extra, code, words = lora_run, [], 4, ""
    if case == "missing":
        source, code, words = tmp_path / "nope", 2, "does not exist"  # a path typed wrong: a bad argument
    elif case == "file":
        source, words = tmp_path / "f.txt", "is a file"
        source.write_text("x")
    elif case == "plain-folder":
        source, words = tmp_path / "empty", "neither a run folder"
        source.mkdir()
    elif case == "unfinished":
        source, words = tmp_path / "run", "did not finish (status: failed)"
        shutil.copytree(lora_run, source)
        manifest = read_manifest(source)
        manifest["status"] = "failed"
        (source / "ftcli_run.json").write_text(json.dumps(manifest))
    elif case == "bad-dtype":
        extra, code, words = ["--dtype", "int8"], 2, "--dtype int8"
    result = cli("export", source, "--output", out, *extra)
    assert result.exit_code == code, result.stdout + result.stderr
    assert words in flat(result.stderr) and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and not out.exists()


def test_export_help_is_light() -> None:
    probe = ("import json, sys\nfrom ftcli.cli import app\ntry:\n    app(['export', '--help'])\n"
             "except SystemExit as exc:\n    code = exc.code\n"
             f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}


def test_verification_catches_an_adapter_lost_in_one_layer(lora_run: Path, cli, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The short, batched verification still tells a merge that dropped one projection's adapter (taken after the
    reference logits, as a faulty merge would) from the right one: exit 1, nothing written."""
    import ftcli.export.merge
    from peft.tuners.lora import LoraLayer

    real_merge = ftcli.export.merge.merge_into_weights

    def merge_losing_one_layer(model):
        layer = next(m for m in model.modules() if isinstance(m, LoraLayer))  # the first targeted projection
        for b in layer.lora_B.values():
            b.weight.data.zero_()
        return real_merge(model)

    monkeypatch.setattr(ftcli.export.merge, "merge_into_weights", merge_losing_one_layer)
    out = tmp_path / "wrong"
    result = cli("export", lora_run, "--output", out)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "verification failed" in flat(result.stderr) and not out.exists() and not leftovers(out)


def test_batched_verification_logits_equal_one_sequence_at_a_time(lora_run: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from ftcli.export.merge import MAX_VERIFY_TOKENS, VERIFY_INPUTS, forward_logits, verification_inputs
    from ftcli.models import attach_adapter, load_model

    model = attach_adapter(load_model(str(tiny_model_dir), dtype="float32", device="cpu"), lora_run)
    inputs = verification_inputs(AutoTokenizer.from_pretrained(str(lora_run)), lora_run / "probe.safetensors")
    assert len(inputs) == VERIFY_INPUTS and all(len(i) <= MAX_VERIFY_TOKENS for i in inputs)
    assert torch.equal(inputs[0], probe_ids(lora_run)[:MAX_VERIFY_TOKENS])  # the run's own probe input comes first
    inputs += [inputs[1][:5], inputs[0][:1]]  # shorter inputs: the batch is padded
    batched, single = forward_logits(model, inputs), forward_logits(model, inputs, batched=False)
    for got, want, ids in zip(batched, single, inputs, strict=True):
        assert got.shape == (len(ids), want.shape[-1])
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_non_finite_check_is_exact(tmp_path: Path) -> None:
    """The one-sum-per-tensor check flags NaN and inf, and clears finite weights whose sum overflows."""
    from ftcli.export.merge import non_finite_weights

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite, but the float32 sum overflows to inf
        model[1].weight[5, 7] = float("nan")
        model[2].bias[3] = float("-inf")
    assert non_finite_weights(model) == ["1.weight", "2.bias"]
