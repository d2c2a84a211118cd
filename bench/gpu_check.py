"""The CUDA paths that CPU tests cannot reach, checked on a real GPU: one line per check, then throughput.

    $ bash bench/gpu_check.sh                  # the same, through its wrapper (prints the environment first)
    $ python bench/gpu_check.py --only env,qlora,export
    $ python bench/gpu_check.py --skip-1b      # the checks only, without the Llama-3.2-1B-shaped throughput runs
    $ python bench/gpu_check.py --only grpo    # GRPO lora/full with --vllm colocate (skipped without vllm)

Needs one CUDA GPU and ftcli installed with its dependencies (torch with CUDA, transformers, trl, peft,
accelerate, datasets, bitsandbytes); flash-attn and liger-kernel are used when installed and reported
when not. It installs and downloads nothing: the models are randomly initialised from a config (a
~0.1B-parameter Llama for the checks, a Llama-3.2-1B-shaped one for throughput), with the built-in tiny
model's tokenizer, and the data is `builtin:alpaca-sample`. Every run goes through the real CLI in its own
process (`python -m ftcli ...`); figures come from what each run recorded in its manifest.

Each check prints one line, `check NAME: ok|FAIL|skip  details (N s)`, and the script exits 1 when any
check failed. Throughput lines: real (non-padding) tokens/s, peak CUDA memory and MFU, the model FLOPs
(6 x parameters per token for full fine-tuning, 4 x for LoRA/QLoRA whose frozen weights get no weight
gradient, attention ignored) over the GPU's dense bf16 peak (`--peak-tflops`, default 989 for H100/H200).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

FAILED: list[str] = []
DATA = ["--dataset", "builtin:alpaca-sample"]
SMOKE = {"on": False}  # --cpu-smoke: the same plumbing on CPU with tiny shapes (checks nothing about CUDA)


def line(name: str, status: str, details: str, started: float) -> None:
    if status == "FAIL":
        FAILED.append(name)
    print(f"check {name}: {status}  {details} ({time.time() - started:.0f} s)", flush=True)


def ftcli(*args: str, check: bool = True, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ftcli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if check and proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)}")
    return proc


def manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "ftcli_run.json").read_text())


def losses(run: Path) -> list[float]:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def build_model(folder: Path, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int | None,
                tie: bool) -> Path:
    """A randomly initialised Llama of that shape in bf16, with the built-in tiny model's tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ftcli.builtin import resolve_builtin_model

    tok = AutoTokenizer.from_pretrained(str(resolve_builtin_model("builtin:tiny-llama")))
    config = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=tie, rope_theta=500000.0,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cpu" if SMOKE["on"] else "cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def check_env(args: argparse.Namespace, work: Path) -> None:
    started = time.time()
    import torch

    if SMOKE["on"]:
        line("env", "skip", f"torch {torch.__version__}: --cpu-smoke, no CUDA check", started)
        return
    if not torch.cuda.is_available():
        line("env", "FAIL", f"torch {torch.__version__}: no CUDA device", started)
        raise SystemExit(1)
    found = []
    for module in ("flash_attn", "liger_kernel", "bitsandbytes", "trl", "peft", "datasets"):
        try:
            found.append(f"{module} {__import__(module).__version__}")
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            found.append(f"{module} missing ({type(exc).__name__})")
    line("env", "ok", f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
         f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}; {', '.join(found)}", started)


def check_devices(args: argparse.Namespace, work: Path) -> None:
    """One process uses the GPU --device names and records it; a GPU that is not there is one line; a rank whose
    LOCAL_RANK is beyond the GPUs it sees (Slurm style: one visible per rank) uses its own one."""
    import torch

    started = time.time()
    model = small_model(work)
    out = work / "device"
    ftcli("train", "--method", "lora", "--model", model, *DATA, "--max-steps", "3", "--output-dir", out, "--overwrite")
    resolved = manifest(out)["resolved"]
    seen = {k: resolved.get(k) for k in ("device", "gpu", "cuda_visible_devices", "cuda_visible_devices_before")}
    line("device-one-process", "ok" if str(resolved.get("device", "")).startswith("cuda") else "FAIL",
         json.dumps(seen), started)
    started = time.time()
    count = 0 if SMOKE["on"] else torch.cuda.device_count()
    proc = ftcli("train", "--method", "lora", "--model", model, *DATA, "--max-steps", "3", "--device", f"cuda:{count}",
                 "--output-dir", work / "device-missing", "--overwrite", check=False)
    said = (proc.stderr.strip().splitlines() or [""])
    line("device-missing-gpu", "ok" if proc.returncode == 2 and len(said) == 1 else "FAIL",
         f"--device cuda:{count} with {count} GPU(s): exit {proc.returncode}: {said[-1][:160]}", started)
    started = time.time()
    out = work / "device-slurm"
    slurm = {"CUDA_VISIBLE_DEVICES": "0", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}
    proc = ftcli("train", "--method", "lora", "--model", model, *DATA, "--max-steps", "3", "--output-dir", out,
                 "--overwrite", check=False, env=slurm)
    status = manifest(out).get("status") if (out / "ftcli_run.json").is_file() else None
    line("device-slurm-rank", "ok" if proc.returncode == 0 and status == "finished" else "FAIL",
         f"LOCAL_RANK=1 with one GPU visible: exit {proc.returncode}, status {status}, device "
         f"{manifest(out)['resolved'].get('device') if status else '?'}", started)


def check_qlora_and_export(args: argparse.Namespace, work: Path) -> None:
    started = time.time()
    model = small_model(work)
    run = work / "qlora"
    ftcli("train", "--method", "qlora", "--model", model, *DATA, "--max-steps", args.steps, "--dtype", "bfloat16",
          "--output-dir", run, "--overwrite")
    precision = manifest(run).get("precision", {})
    # QLoRA computes in bf16: autocast must say so although kbit preparation leaves model.dtype float32.
    status = "ok" if precision.get("autocast") == "bfloat16" and "nf4" in precision.get("weights", {}) else "FAIL"
    line("qlora-dtypes", status, f"precision {json.dumps(precision, sort_keys=True)}; loss {losses(run)[0]:.3f} -> "
         f"{losses(run)[-1]:.3f}", started)
    started = time.time()
    out = work / "qlora-export"
    proc = ftcli("export", run, "--output", out, "--device", "cpu" if SMOKE["on"] else "cuda", "--overwrite",
                 check=False)
    said = " ".join(proc.stdout.split())
    verify = [said[said.find("verify:"):said.find("prompt(s)") + len("prompt(s)")]] if "verify:" in said else []
    config = json.loads((out / "config.json").read_text()) if proc.returncode == 0 else {}
    quant_left = "quantization_config" in config
    status = "ok" if proc.returncode == 0 and not quant_left else "FAIL"
    if proc.returncode == 0:
        record = json.loads((out / "ftcli_export.json").read_text())
        verify.append(f"tolerance of {record.get('verification', {}).get('tolerance_of')}")
    line("qlora-export-cuda", status, f"exit {proc.returncode}; {'; '.join(verify)[:200]}; "
         f"quantization_config in config.json: {quant_left}; "
         f"{proc.stderr.strip().splitlines()[-1][:160] if proc.returncode else ''}", started)


def check_float16_and_tf32(args: argparse.Namespace, work: Path) -> None:
    """float16 trains under a gradient scaler over float32 master weights; a float32 --compile run records TF32 and
    its export is judged with TF32's tolerance."""
    model = small_model(work)
    for method in ("lora", "full"):
        started = time.time()
        out = work / f"fp16-{method}"
        ftcli("train", "--method", method, "--model", model, *DATA, "--max-steps", "5", "--dtype", "float16",
              "--output-dir", out, "--overwrite")
        precision, got = manifest(out).get("precision", {}), losses(out)
        finite = all(x == x and abs(x) != float("inf") for x in got)
        ok = precision.get("grad_scaler") is True and precision.get("autocast") == "float16" and finite
        line(f"float16-{method}", "ok" if ok else "FAIL", f"precision {json.dumps(precision, sort_keys=True)}; "
             f"losses {', '.join(f'{x:.3f}' for x in got)}", started)
    started = time.time()
    out, exported = work / "fp32-compile", work / "fp32-compile-export"
    ftcli("train", "--method", "full", "--model", model, *DATA, "--max-steps", "3", "--dtype", "float32",
          "--compile", "--output-dir", out, "--overwrite")
    precision = manifest(out).get("precision", {})
    proc = ftcli("export", out, "--output", exported, "--device", "cpu" if SMOKE["on"] else "cuda", "--dtype",
                 "float32", "--overwrite", check=False)
    record = json.loads((exported / "ftcli_export.json").read_text()) if proc.returncode == 0 else {}
    tolerance_of = record.get("verification", {}).get("tolerance_of")
    ok = proc.returncode == 0 and (tolerance_of == "tf32") == bool(precision.get("tf32"))
    line("tf32-compile-export", "ok" if ok else "FAIL", f"tf32 {precision.get('tf32')}, liger "
         f"{precision.get('liger')}; export exit {proc.returncode}, tolerance of {tolerance_of}", started)


def check_fsdp_resume(args: argparse.Namespace, work: Path) -> None:
    started = time.time()
    import torch

    model = small_model(work)
    nproc = "2" if SMOKE["on"] else str(min(torch.cuda.device_count(), 2))
    common = ["--method", "fsdp", "--model", model, *DATA, "--nproc-per-node", nproc, "--dtype", "bfloat16",
              "--max-steps", "10", "--save-steps", "5"]
    whole, resumed = work / "fsdp-whole", work / "fsdp-resumed"
    ftcli("train", *common, "--output-dir", whole, "--overwrite")
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(whole / "checkpoint-5", resumed / "checkpoint-5")
    shutil.copy(whole / "ftcli_run.json", resumed / "ftcli_run.json")
    ftcli("train", *common, "--output-dir", resumed, "--resume")
    a, b = losses(whole)[5:], losses(resumed)[-len(losses(whole)[5:]):]
    diff = max(abs(x - y) for x, y in zip(a, b)) if a and len(a) == len(b) else float("inf")
    backend = manifest(whole).get("resolved", {}).get("processes")
    line("fsdp-nccl-save-resume", "ok" if diff <= 1e-2 else "FAIL",
         f"{nproc} process(es) ({backend} recorded); steps 6-10 uninterrupted vs resumed: largest loss difference "
         f"{diff:.2e}", started)


def check_padding_free(args: argparse.Namespace, work: Path) -> None:
    started = time.time()
    model = small_model(work)
    runs = {}
    variants = [("sdpa-padded", ["--attn-implementation", "sdpa"]),
                ("sdpa-padding-free", ["--attn-implementation", "sdpa", "--padding-free"]),
                ("fa2-padded", ["--attn-implementation", "flash_attention_2"]),
                ("fa2-padding-free", ["--attn-implementation", "flash_attention_2", "--padding-free"])]
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        variants = variants[:2]
        print("flash-attn is not installed: padding-free vs padded on SDPA only", flush=True)
    for name, extra in variants:
        out = work / name
        proc = ftcli("train", "--method", "lora", "--model", model, *DATA, "--max-steps", "5", "--dtype", "bfloat16",
                     "--output-dir", out, "--overwrite", *extra, check=False)
        runs[name] = losses(out) if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
    ref = runs["sdpa-padded"]
    parts = []
    worst = 0.0
    for name, got in runs.items():
        if isinstance(got, str) or isinstance(ref, str):
            parts.append(f"{name}: {got if isinstance(got, str) else 'ran'}")
            continue
        d = max(abs(x - y) for x, y in zip(got, ref))
        worst = max(worst, d)
        parts.append(f"{name} {d:.2e}")
    ok = not isinstance(ref, str) and worst <= 2e-2 and not isinstance(runs["sdpa-padding-free"], str)
    line("padding-free-vs-padded", "ok" if ok else "FAIL",
         "largest per-step loss difference vs sdpa padded: " + "; ".join(parts), started)


def check_compile(args: argparse.Namespace, work: Path) -> None:
    started = time.time()
    model = small_model(work)
    out = work / "lora-compile"
    ftcli("train", "--method", "lora", "--model", model, *DATA, "--max-steps", args.steps, "--dtype", "bfloat16",
          "--compile", "--output-dir", out, "--overwrite")
    m = manifest(out)["metrics"]
    line("lora-compile", "ok", f"{m['real_tokens_per_second']:,.0f} real tokens/s, loss {losses(out)[0]:.3f} -> "
         f"{losses(out)[-1]:.3f}", started)


def check_estimate(args: argparse.Namespace, work: Path) -> None:
    model = small_model(work)
    for method in ("lora", "qlora"):
        started = time.time()
        out = work / f"estimate-{method}"
        run_args = ["--batch-size", "4", "--seq-length", "512", "--dtype", "bfloat16"]
        ftcli("train", "--method", method, "--model", model, *DATA, "--max-steps", "5", "--packing", *run_args,
              "--output-dir", out, "--overwrite")
        measured = manifest(out)["metrics"]["peak_memory_bytes"]
        proc = ftcli("inspect", model, "--json", *run_args)
        rows = json.loads(proc.stdout)["memory"]["methods"]
        estimate = next(r["total_bytes"] for r in rows if r["method"] == method)
        ratio = estimate / measured
        status = "skip" if SMOKE["on"] else "ok" if 0.6 <= ratio <= 1.6 else "FAIL"  # CPU RSS is not GPU memory
        line(f"estimate-{method}", status,
             f"estimate {estimate / 2**30:.2f} GiB vs measured peak {measured / 2**30:.2f} GiB (x{ratio:.2f})", started)


GRPO_REWARD = """def share_e(prompts, completions, **kwargs):
    return [c.count("e") / max(1, len(c)) for c in completions]
"""


def check_grpo(args: argparse.Namespace, work: Path) -> None:
    """GRPO, lora and full, generating with vLLM beside the training process (--vllm colocate: TRL syncs the
    weights into vLLM every step): the run finishes, every step logs a reward, completions.jsonl is written.
    Skipped when vllm is not installed; --cpu-smoke runs the same without --vllm (transformers generation)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None and not SMOKE["on"]:
        for method in ("lora", "full"):
            line(f"grpo-{method}-vllm-colocate", "skip", "vllm is not installed: pip install vllm to check this path",
                 time.time())
        return
    model = small_model(work)
    prompts = work / "grpo-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write some letters, round {i}:", "answer": "eeee"}) + "\n"
                               for i in range(64)), encoding="utf-8")
    reward = work / "grpo_reward.py"
    reward.write_text(GRPO_REWARD, encoding="utf-8")
    for method in ("lora", "full"):
        started = time.time()
        name = f"grpo-{method}" + ("" if SMOKE["on"] else "-vllm-colocate")
        out = work / name
        generation = [] if SMOKE["on"] else ["--vllm", "colocate"]
        proc = ftcli("train", "--objective", "grpo", "--method", method, "--model", model, "--dataset", prompts,
                     "--reward", f"{reward}:share_e", "--max-steps", args.steps, "--max-completion-length", "64",
                     "--dtype", "bfloat16", "--output-dir", out, "--overwrite", *generation, check=False)
        if proc.returncode != 0:
            line(name, "FAIL", (proc.stderr.strip().splitlines() or ["?"])[-1][:200], started)
            continue
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if r.strip()]
        rewards = [r["reward"] for r in rows if "reward" in r]
        sampled = (out / "completions.jsonl").is_file() and (out / "completions.jsonl").stat().st_size > 0
        m = manifest(out)
        ok = m.get("status") == "finished" and len(rewards) == int(args.steps) and sampled
        line(name, "ok" if ok else "FAIL", f"{'vLLM colocate' if generation else 'transformers'} generation; "
             f"{len(rewards)} steps logged a reward ({rewards[0] if rewards else float('nan'):.3f} -> "
             f"{rewards[-1] if rewards else float('nan'):.3f}); completions.jsonl written: {sampled}; "
             f"{m.get('metrics', {}).get('train_runtime', float('nan')):.0f} s of training", started)


def throughput(args: argparse.Namespace, work: Path) -> None:
    """All four methods on a Llama-3.2-1B-shaped random model in bf16, packed rows of 2048 tokens."""
    started = time.time()
    model = small_model(work) if SMOKE["on"] else build_model(work / "llama-1b", hidden=2048, layers=16, heads=32,
                                                              kv_heads=8, inter=8192, vocab=128256, tie=True)
    print(f"built a Llama-3.2-1B-shaped random model ({time.time() - started:.0f} s)", flush=True)
    seq = "256" if SMOKE["on"] else "2048"
    for method, extra in (("full", []), ("lora", []), ("qlora", []), ("fsdp", ["--nproc-per-node", "1"])):
        started = time.time()
        out = work / f"tp-{method}"
        proc = ftcli("train", "--method", method, "--model", model, *DATA, "--max-steps", args.steps, "--packing",
                     "--seq-length", seq, "--batch-size", "4", "--gradient-accumulation-steps", "1",
                     "--dtype", "bfloat16", "--output-dir", out, "--overwrite", *extra, check=False)
        if proc.returncode != 0:
            line(f"throughput-{method}", "FAIL", (proc.stderr.strip().splitlines() or ["?"])[-1][:200], started)
            continue
        m = manifest(out)
        metrics, resolved = m["metrics"], m["resolved"]
        params = resolved["total_parameters"]
        per_token = 6 if resolved["saves"] == "model" else 4
        mfu = per_token * params * metrics["real_tokens_per_second"] / (args.peak_tflops * 1e12)
        line(f"throughput-{method}", "ok", f"{metrics['real_tokens_per_second']:,.0f} real tokens/s, peak "
             f"{metrics['peak_memory_bytes'] / 2**30:.2f} GiB, MFU {100 * mfu:.1f}% ({per_token}N FLOPs/token, "
             f"{params / 1e9:.2f}B params, attention {resolved.get('attn_implementation')})", started)


_SMALL: dict[str, Path] = {}


def small_model(work: Path) -> Path:
    """~0.1B parameters: wide enough for real kernels, small enough for quick runs."""
    if "model" not in _SMALL and SMOKE["on"]:
        _SMALL["model"] = build_model(work / "llama-smoke", hidden=64, layers=2, heads=2, kv_heads=1, inter=128,
                                      vocab=None, tie=False)
    if "model" not in _SMALL:
        _SMALL["model"] = build_model(work / "llama-0.1b", hidden=768, layers=12, heads=12, kv_heads=4, inter=2048,
                                      vocab=32000, tie=False)
    return _SMALL["model"]


CHECKS: dict[str, Callable[[argparse.Namespace, Path], None]] = {
    "env": check_env, "devices": check_devices, "qlora": check_qlora_and_export, "precision": check_float16_and_tf32,
    "fsdp": check_fsdp_resume, "padding": check_padding_free,
    "compile": check_compile, "estimate": check_estimate, "grpo": check_grpo, "throughput": throughput,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for models and runs (default: a temp folder)")
    parser.add_argument("--steps", default="20", help="optimizer steps per run")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks: {','.join(CHECKS)}")
    parser.add_argument("--skip-1b", action="store_true", help="leave out the 1B-shaped throughput runs")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the same plumbing on CPU with tiny shapes (a test of this script, not of CUDA)")
    args = parser.parse_args()
    SMOKE["on"] = args.cpu_smoke
    work = args.work or Path(tempfile.mkdtemp(prefix="ftcli-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FTCLI_HOME", str(work / "home"))
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    if args.skip_1b:
        chosen = [c for c in chosen if c != "throughput"]
    for name in chosen:
        started = time.time()
        try:
            CHECKS[name](args, work)
        except SystemExit:
            raise
        except Exception as exc:  # noqa: BLE001 - one line per failed check, then the next check
            line(name, "FAIL", " ".join(f"{type(exc).__name__}: {exc}".split())[:300], started)
    print(f"{len(FAILED)} check(s) failed: {', '.join(FAILED)}" if FAILED else "all checks passed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
