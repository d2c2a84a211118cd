"""LoRA variants through the CLI: DoRA, rsLoRA, PiSSA/OLoRA starts, trained biases; each exported and checked
against peft's own base + adapter and against the trained model's own logits.

    $ python -m pytest -q tests/test_lora_variants.py
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import read_manifest, write_small_alpaca

TINY = ["--model", "builtin:tiny-llama"]
RANK = 8
# float32 on both sides: only the order of the sums differs (relative to the largest logit).
F32 = 1e-4


def invoke(*args):
    from typer.testing import CliRunner

    from ftcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(text: str) -> str:
    """Output with Rich's box drawing and line wrapping taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def biased_model(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """The tiny Llama with biases on every projection (attention_bias, mlp_bias), random ones: the built-in has none."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("biased") / "tiny-llama-biased"
    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(tiny_model_dir / name, folder / name)
    return folder


RUNS = {
    # name: (method, extra train flags, what the manifest's config records)
    "dora": ("lora", ["--use-dora"], {"use_dora": True}),
    "rslora": ("lora", ["--use-rslora", "--lora-alpha", "4", "--lora-init", "gaussian"],
               {"use_rslora": True, "lora_alpha": 4.0, "lora_init": "gaussian"}),
    "pissa": ("lora", ["--lora-init", "pissa", "--save-steps", "1"], {"lora_init": "pissa"}),
    "qlora-dora": ("qlora", ["--use-dora"], {"use_dora": True}),
    "olora-bias": ("lora", ["--lora-init", "olora", "--lora-bias", "all", "--use-rslora"],
                   {"lora_init": "olora", "lora_bias": "all", "use_rslora": True}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, biased_model: Path, tiny_model_dir: Path) -> dict[str, tuple[Path, Path, Path]]:
    """name -> (run folder, export folder, base model folder): each run trains 2 steps and is exported."""
    root = tmp_path_factory.mktemp("variants")
    data = write_small_alpaca(root / "small.jsonl")
    out = {}
    for name, (method, extra, _) in RUNS.items():
        base = biased_model if name == "olora-bias" else tiny_model_dir
        run, export = root / f"run-{name}", root / f"export-{name}"
        # A high learning rate so the adapter clearly moves the logits in two steps.
        result = invoke("train", "--method", method, "--model", base, "--dataset", data, "--max-steps", "2",
                        "--learning-rate", "1e-2", "--output-dir", run, *extra)
        assert result.exit_code == 0, result.stdout + result.stderr
        result = invoke("export", run, "--output", export)
        assert result.exit_code == 0, result.stdout + result.stderr
        assert "verify: largest logit difference vs base + adapter" in flat(result.stdout)
        (export.parent / f"export-{name}.txt").write_text(flat(result.stdout))
        out[name] = (run, export, base)
    return out


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()


def load_base(base: Path, four_bit: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, device_map={"": "cpu"}, **kwargs)


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor, four_bit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(base + adapter, base alone) on the ORIGINAL base, computed here by peft itself."""
    from peft import PeftModel

    from ftcli.methods.qlora import keep_cpu_inference_in_compute_dtype

    model = PeftModel.from_pretrained(load_base(base, four_bit), str(adapter))
    keep_cpu_inference_in_compute_dtype(model)  # the 4-bit CPU kernel training used (a no-op in float)
    with_adapter = logits_of(model, ids)
    with model.disable_adapter():
        return with_adapter, logits_of(model, ids)


def exported_logits(export: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits_of(AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32), ids)


def probe(run: Path) -> dict[str, torch.Tensor]:
    """The trained model's own logits on a fixed input, saved by the run from the model in memory."""
    return load_file(str(run / "probe.safetensors"))


def scale(reference: torch.Tensor) -> float:
    return max(1.0, float(reference.abs().max()))


@pytest.mark.parametrize("name", list(RUNS))
def test_export_equals_peft_base_plus_adapter_and_the_trained_model(runs, name: str) -> None:
    run, export, base = runs[name]
    saved = probe(run)
    ids = saved["input_ids"]
    four_bit = RUNS[name][0] == "qlora"
    expected, base_only = peft_logits(base, run, ids, four_bit=four_bit)
    got = exported_logits(export, ids)
    tolerance = F32 * scale(expected)
    assert float((got - expected).abs().max()) <= tolerance
    # The adapter moves the logits far beyond the tolerance: a lost (or wrong) adapter could not pass.
    assert float((expected - base_only).abs().max()) > 100 * tolerance
    # The trained model itself: QLoRA's adapter trained in bfloat16, the rest in float32.
    trained_tolerance = (2e-2 if four_bit else F32) * scale(saved["logits"])
    assert float((got - saved["logits"]).abs().max()) <= trained_tolerance


@pytest.mark.parametrize("name", list(RUNS))
def test_variant_is_recorded_in_manifest_config_copy_and_adapter(runs, name: str) -> None:
    run, _, _ = runs[name]
    method, _, recorded = RUNS[name]
    config = read_manifest(run)["config"]
    copy = yaml.safe_load((run / "ftcli_config.yaml").read_text())
    adapter = json.loads((run / "adapter_config.json").read_text())
    for key, value in recorded.items():
        assert config[key] == value and copy[key] == value, key
    for key in ("use_dora", "use_rslora", "lora_init", "lora_bias"):
        assert key in config and key in copy
    assert adapter["use_dora"] == config["use_dora"] and adapter["use_rslora"] == config["use_rslora"]
    assert adapter["bias"] == config["lora_bias"]
    if config["lora_init"] in ("pissa", "olora"):
        # Saved converted: plain LoRA of rank 2r on the original base, the scaling kept.
        assert adapter["init_lora_weights"] is True and adapter["r"] == 2 * RANK
        factor = math.sqrt(2) if config["use_rslora"] else 2
        assert adapter["lora_alpha"] == pytest.approx(config["lora_alpha"] * factor)
    else:
        assert adapter["r"] == RANK and adapter["init_lora_weights"] == {"default": True}.get(config["lora_init"],
                                                                                             config["lora_init"])


@pytest.mark.parametrize("name, variant", [
    ("dora", "DoRA"), ("rslora", "rsLoRA, gaussian start"), ("pissa", "pissa start converted to plain LoRA of rank 16 on the original base"),
    ("qlora-dora", "DoRA"), ("olora-bias", "rsLoRA, biases all, olora start converted to plain LoRA of rank 16"),
])
def test_export_names_the_variant_on_screen_record_and_card(runs, name: str, variant: str) -> None:
    run, export, _ = runs[name]
    assert f"adapter: {variant}" in (export.parent / f"export-{name}.txt").read_text()
    record = json.loads((export / "ftcli_export.json").read_text())
    assert variant in record["lora"]["variant"] and record["verification"]["passed"] is True
    assert f"| LoRA variant | {record['lora']['variant']} |" in (export / "README.md").read_text()


def test_dora_magnitude_is_saved_and_merged(runs, tmp_path: Path) -> None:
    """Dropping DoRA's magnitude vectors (the adapter read as plain LoRA) gives other logits than the export."""
    from peft import PeftModel

    run, export, base = runs["dora"]
    tensors = load_file(str(run / "adapter_model.safetensors"))
    magnitudes = [k for k in tensors if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 2 * 7  # every adapted projection of both layers
    plain = tmp_path / "as-plain-lora"
    plain.mkdir()
    save_file({k: v for k, v in tensors.items() if k not in magnitudes}, str(plain / "adapter_model.safetensors"))
    config = json.loads((run / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    ids = probe(run)["input_ids"]
    got = exported_logits(export, ids)
    without_magnitude = logits_of(PeftModel.from_pretrained(load_base(base), str(plain)), ids)
    assert float((got - without_magnitude).abs().max()) > 100 * F32 * scale(got)


def test_pissa_adapter_on_the_original_base_would_be_wrong_unconverted(runs, tmp_path: Path) -> None:
    """The trained PiSSA matrices alone on the original base (what a naive save holds) are not the trained model:
    the conversion's -B0·A0 half is what makes base + adapter equal it."""
    from peft import PeftModel

    run, _, base = runs["pissa"]
    tensors = load_file(str(run / "adapter_model.safetensors"))
    naive = {k: (v[:RANK] if ".lora_A." in k else v[:, :RANK]).contiguous() for k, v in tensors.items()}
    folder = tmp_path / "naive"
    folder.mkdir()
    save_file(naive, str(folder / "adapter_model.safetensors"))
    config = json.loads((run / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": RANK, "lora_alpha": config["lora_alpha"] / 2}))
    saved = probe(run)
    wrong = logits_of(PeftModel.from_pretrained(load_base(base), str(folder)), saved["input_ids"])
    assert float((wrong - saved["logits"]).abs().max()) > 100 * F32 * scale(saved["logits"])


def test_pissa_checkpoint_keeps_its_trained_form_and_exports(runs, tmp_path: Path) -> None:
    """A checkpoint stays in PiSSA form (resuming rebuilds the residual base); peft rebuilds it on load, so the
    checkpoint exports too."""
    run, _, base = runs["pissa"]
    checkpoint = run / "checkpoint-1"
    adapter = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter["init_lora_weights"] == "pissa" and adapter["r"] == RANK
    out = tmp_path / "checkpoint-export"
    result = invoke("export", checkpoint, "--output", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    ids = probe(run)["input_ids"]
    expected, _ = peft_logits(base, checkpoint, ids)
    assert float((exported_logits(out, ids) - expected).abs().max()) <= F32 * scale(expected)


def test_biases_train_and_are_merged(runs) -> None:
    run, export, base = runs["olora-bias"]
    trained = load_file(str(run / "adapter_model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    merged = load_file(str(export / "model.safetensors"))
    biases = [k for k in trained if k.endswith(".bias")]
    assert len(biases) == 2 * 7  # every projection's bias, in both layers
    for key in biases:
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")  # an adapted layer's own bias
        assert not torch.equal(trained[key], original[name]), f"{name} did not train"
        assert torch.allclose(merged[name], trained[key], atol=1e-6), f"{name} is not the trained bias"


def test_resume_with_another_variant_is_refused(runs) -> None:
    run, _, _ = runs["pissa"]
    data = run.parent / "small.jsonl"
    result = invoke("train", "--method", "lora", *TINY, "--dataset", data, "--max-steps", "3", "--learning-rate",
                    "1e-2", "--output-dir", run, "--resume", run / "checkpoint-1")
    assert result.exit_code == 2
    one_line_error(result, "lora_variant 'init pissa' -> 'plain LoRA'")


@pytest.mark.parametrize("flags, needles", [
    (["--method", "full", "--use-dora"], ["--use-dora", "--method full"]),
    (["--method", "fsdp", "--full-parameters", "--lora-bias", "all"], ["--lora-bias", "--full-parameters"]),
    (["--method", "qlora", "--lora-init", "pissa"], ["--lora-init pissa", "4-bit"]),
    (["--method", "qlora", "--lora-init", "olora"], ["--lora-init olora", "4-bit"]),
    (["--method", "lora", "--lora-init", "loftq"], ["--lora-init loftq", "--method qlora"]),
    (["--method", "qlora", "--lora-init", "loftq", "--use-dora"], ["--use-dora", "loftq"]),
    (["--method", "qlora", "--lora-init", "loftq", "--device", "cpu"], ["needs CUDA"]),
    (["--method", "lora", "--lora-init", "eva"], ["--lora-init", "'eva'"]),
    (["--method", "lora", "--lora-bias", "some"], ["--lora-bias", "'some'"]),
])
def test_refusals_are_one_line_before_anything_loads(flags, needles, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("train", *TINY, "--dataset", "builtin:alpaca-sample", "--output-dir", out, *flags)
    one_line_error(result, *needles)
    assert not out.exists()


def test_loftq_on_cpu_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    """--device auto on a machine without CUDA: the device is only known once resolved, still before loading."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: LoftQ runs")
    out = tmp_path / "run"
    result = invoke("train", "--method", "qlora", *TINY, "--dataset", write_small_alpaca(tmp_path / "d.jsonl"),
                    "--output-dir", out, "--lora-init", "loftq", "--max-steps", "1")
    err = one_line_error(result, "--lora-init loftq needs CUDA", "cpu")
    assert "model:" not in result.stdout, err  # the model line is printed once it has loaded
    assert not out.exists()


def test_lora_bias_on_a_model_without_biases_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("train", "--method", "lora", *TINY, "--dataset", write_small_alpaca(tmp_path / "d.jsonl"),
                    "--output-dir", out, "--lora-bias", "all", "--max-steps", "1")
    one_line_error(result, "--lora-bias all", "no bias")
    assert not out.exists()


def test_help_shows_the_variant_defaults() -> None:
    text = flat(invoke("train", "--help").stdout)
    for flag, default in (("--use-dora", "off"), ("--use-rslora", "off"), ("--lora-init", "default"),
                          ("--lora-bias", "none")):
        start = text.index(flag)
        assert f"[default: {default}]" in text[start:start + 400], flag


def test_compile_cache_key_tells_variants_apart(tiny_model_dir: Path) -> None:
    """`warmup` and `train --compile` share a compile cache only where the compiled graph is the same."""
    from ftcli.config import build_run_config
    from ftcli.training.warmup import cache_key_fields

    dataset = {"input_ids": [[1, 2, 3]]}

    def key(**flags):
        config = build_run_config({"method": "lora", "model": "builtin:tiny-llama", **flags})
        return cache_key_fields(config, dataset, "cpu", torch.float32)

    plain, dora = key(), key(use_dora=True)
    assert "variant" not in plain["lora"]  # plain LoRA keeps the key it had before the variants existed
    assert dora["lora"]["variant"] == "dora" and dora != plain
    assert key(lora_bias="all") != plain and key(use_rslora=True) != plain
