"""Preference tuning (`ftcli train --objective dpo`) through the real CLI on the built-in tiny model.

The preference sample is built from the built-in Alpaca sample: each pair's prompt is a row's instruction, its
chosen answer that row's real response, and its rejected answer the response of another row, taken from a small
pool of rows that never appear as prompts. The held-out pairs have prompts and chosen answers the training never
saw, with rejected answers from the same pool, so what DPO learns (the pool's answers are worse than the real
ones) can show on them. The implicit reward margin on them is computed here with plain forward passes of
transformers/peft models loaded from the saved run, independently of TRL and of ftcli's prepared data.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import losses, read_manifest

TINY = ["--model", "builtin:tiny-llama"]
BETA = 0.1
POOL, TRAIN, HELD = 3, 24, 8


def _short_rows() -> list[dict]:
    from ftcli.builtin.alpaca_sample import alpaca_sample_rows

    return [r for r in alpaca_sample_rows() if len(r["output"]) < 40 and not r["input"]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict[str, Path]:
    rows = _short_rows()
    pool, train, held = rows[:POOL], rows[POOL:POOL + TRAIN], rows[POOL + TRAIN:POOL + TRAIN + HELD]
    pair = (lambda i, r: {"prompt": r["instruction"] + "\n", "chosen": r["output"], "rejected": pool[i % POOL]["output"]})
    folder = tmp_path_factory.mktemp("dpo-data")
    return {
        "train": write_jsonl(folder / "train.jsonl", [pair(i, r) for i, r in enumerate(train)]),
        "held": write_jsonl(folder / "held.jsonl", [pair(i, r) for i, r in enumerate(held)]),
        "sft": write_jsonl(folder / "sft.jsonl", [{"prompt": r["instruction"] + "\n", "completion": r["output"]}
                                                   for r in train]),
    }


@pytest.fixture(scope="module")
def runner():
    from typer.testing import CliRunner

    from ftcli.cli import app

    def invoke(*args: object):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def ok(result) -> None:
    assert result.exit_code == 0, result.stdout + (result.stderr or "")


@pytest.fixture(scope="module")
def tokenizer():
    from ftcli.models import apply_pad_policy, load_tokenizer

    tok = load_tokenizer("builtin:tiny-llama")
    apply_pad_policy(tok)
    return tok


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, sample, runner) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sft"
    ok(runner("train", "--method", "lora", *TINY, "--dataset", sample["sft"], "--max-steps", 3, "--batch-size", 8,
              "--learning-rate", "5e-3", "--output-dir", out))
    return out


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, sample, runner, sft_run) -> tuple[Path, str]:
    """LoRA DPO continuing the SFT run, a few epochs, evaluated on the held-out pairs."""
    out = tmp_path_factory.mktemp("runs") / "dpo"
    result = runner("train", "--objective", "dpo", "--method", "lora", "--model", sft_run, "--dataset",
                    sample["train"], "--eval-dataset", sample["held"], "--num-epochs", 4, "--batch-size", 8,
                    "--learning-rate", "1e-2", "--dpo-beta", BETA, "--seq-length", 96, "--output-dir", out)
    ok(result)
    return out, result.stdout


# ---- independent log-probabilities ----------------------------------------------------------------------------


def answer_logp(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    return float(logps[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].sum())


def plain_pair_ids(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    """A string pair as the SFT prompt/completion rules render it: BOS + prompt, each answer + one EOS."""
    tok = (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    return [tokenizer.bos_token_id] + tok(row["prompt"]), tok(row["chosen"]) + [tokenizer.eos_token_id], \
        tok(row["rejected"]) + [tokenizer.eos_token_id]


def sft_merged_base(tiny_model_dir: Path, sft_run: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(sft_run)).merge_and_unload()


# ---- data: shapes, masks, truncation, refusals ----------------------------------------------------------------


def test_string_pairs_masked_token_by_token(tmp_path: Path, runner, tokenizer) -> None:
    from datasets import load_from_disk

    rows = [{"prompt": "Say hi.\n", "chosen": "Hi there!", "rejected": "Go away."},
            {"prompt": "Add 1 and 1.\n", "chosen": "2" + tokenizer.eos_token, "rejected": "11"},  # EOS not doubled
            {"prompt": "Count.\n", "chosen": " one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
             "rejected": "1"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "prepared"
    result = runner("prepare", "--objective", "dpo", *TINY, "--dataset", data, "--seq-length", 16,
                    "--max-prompt-length", 6, "--output-dir", out)
    ok(result)
    assert "1 pairs have one answer cut" in " ".join(result.stdout.split())
    manifest = json.loads((out / "ftcli_prepared.json").read_text())
    assert manifest["kind"] == "preference" and manifest["stats"]["cut_differently"] == 1
    by_prompt = {tuple(r["prompt_ids"]): r for r in load_from_disk(str(out))}
    eos = tokenizer.eos_token_id
    for raw in rows:
        want_p, want_c, want_r = plain_pair_ids(tokenizer, {**raw, "chosen": raw["chosen"].removesuffix(
            tokenizer.eos_token)})
        got = by_prompt[tuple(want_p[:6])]
        assert got["prompt_ids"] == want_p[:6]
        room = 16 - len(got["prompt_ids"])
        assert got["rejected_ids"] == want_r[:room]
        assert got["chosen_ids"] == want_c[:room]
        for side in ("chosen_ids", "rejected_ids"):
            whole = len(got[side]) < room or got[side] == (want_c if side == "chosen_ids" else want_r)
            assert got[side].count(eos) == (1 if whole else 0)  # once at the end, or cut with the answer
    cut = by_prompt[tuple(plain_pair_ids(tokenizer, rows[2])[0][:6])]
    assert eos not in cut["chosen_ids"] and cut["rejected_ids"][-1] == eos


def test_message_pairs_masked_token_by_token(tmp_path: Path, runner, tokenizer) -> None:
    from datasets import load_from_disk

    user = {"role": "user", "content": "Name a color."}
    shapes = {"shared": [{"chosen": [user, {"role": "assistant", "content": "Blue."}],  # the shared prefix: prompt
                          "rejected": [user, {"role": "assistant", "content": "Seven."}]}],
              "prompt": [{"prompt": [user], "chosen": "Red.", "rejected": {"role": "assistant", "content": "Tuesday."}}],
              # UltraFeedback: a prompt string that repeats the conversations' first turn
              "repeated": [{"prompt": "Name a color.", "chosen": [user, {"role": "assistant", "content": "Blue."}],
                            "rejected": [user, {"role": "assistant", "content": "Seven."}]}]}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tok = (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt_text = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    answers = {"Blue.", "Seven.", "Red.", "Tuesday."}
    seen = set()
    for name, rows in shapes.items():
        out = tmp_path / name
        ok(runner("prepare", "--objective", "dpo", *TINY, "--dataset", write_jsonl(tmp_path / f"{name}.jsonl", rows),
                  "--seq-length", 64, "--output-dir", out))
        for row in load_from_disk(str(out)):
            assert row["prompt_ids"] == tok(prompt_text)
            for side in ("chosen_ids", "rejected_ids"):
                ids = row[side]
                answer = next(a for a in answers if tokenizer.decode(ids[:-1]).startswith(a))
                seen.add(answer)
                full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": answer}], tokenize=False)
                assert row["prompt_ids"] + ids[:-1] == tok(full)
                assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
                assert ids.count(end_of_turn) == 1  # the end of turn is trained once, in the answer
    assert seen == answers
    shown = runner("inspect", tmp_path / "shared.jsonl", "--json")
    ok(shown)
    report = json.loads(shown.stdout)
    assert [p["loss"] for p in report["example"]["chosen"]].count(False) == len(tok(prompt_text))


def test_whole_text_pairs_split_at_their_shared_words(tmp_path: Path, runner, tokenizer) -> None:
    from datasets import load_from_disk

    data = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "Human: hi Assistant: Hello friend",
                                                "rejected": "Human: hi Assistant: Go away"}])
    out = tmp_path / "prepared"
    ok(runner("prepare", "--objective", "dpo", *TINY, "--dataset", data, "--output-dir", out))
    row = load_from_disk(str(out))[0]
    want = plain_pair_ids(tokenizer, {"prompt": "Human: hi Assistant: ", "chosen": "Hello friend",
                                      "rejected": "Go away"})
    assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == want


def test_columns_map_other_names(tmp_path: Path, runner, tokenizer) -> None:
    from datasets import load_from_disk

    data = write_jsonl(tmp_path / "named.jsonl", [{"question": "Say hi.\n", "good": "Hi!", "bad": "No."}])
    out = tmp_path / "prepared"
    ok(runner("prepare", "--objective", "dpo", *TINY, "--dataset", data, "--columns",
              "prompt=question,chosen=good,rejected=bad", "--output-dir", out))
    want = plain_pair_ids(tokenizer, {"prompt": "Say hi.\n", "chosen": "Hi!", "rejected": "No."})
    row = load_from_disk(str(out))[0]
    assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == want


def test_data_without_a_pair_is_refused_in_one_line(tmp_path: Path, runner) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Hi", "input": "", "output": "Hello"}])
    result = runner("train", "--objective", "dpo", "--method", "lora", *TINY, "--dataset", data,
                    "--output-dir", tmp_path / "run")
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(data) in lines[0] and "columns found: 'instruction', 'input', 'output'" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, needle", [
    (["--dpo-beta", "0.2"], "--dpo-beta applies to --objective dpo"),
    (["--objective", "dpo", "--method", "lora", "--precompute-ref"], "--precompute-ref: with --method lora"),
    (["--objective", "dpo", "--packing"], "--packing applies to single examples"),
    (["--objective", "dpo", "--compile"], "--compile is not available with --objective dpo"),
    (["--objective", "dpo", "--dpo-loss", "nope"], "--dpo-loss"),
    (["--objective", "dpo", "--method", "lora", "--lora-init", "pissa"], "--lora-init pissa starts the adapter"),
    (["--objective", "dpo", "--train-on-inputs"], "--train-on-inputs puts the prompt in an SFT loss"),
    (["--objective", "dpo", "--method", "lora", "--lora-dropout", "0.1"], "DPO runs without dropout"),
])
def test_options_that_make_no_sense_are_refused(tmp_path: Path, runner, args: list[str], needle: str) -> None:
    result = runner("train", *TINY, "--dataset", "builtin:alpaca-sample", *args, "--output-dir", tmp_path / "r")
    assert result.exit_code == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_warmup_is_refused(tmp_path: Path, sample, runner) -> None:
    result = runner("warmup", "--objective", "dpo", "--method", "lora", *TINY, "--dataset", sample["train"])
    assert result.exit_code == 2 and "does not take" in result.stderr, result.stderr


# ---- training: lora (SFT -> DPO), margin, export, generate --------------------------------------------------------


def test_held_out_margin_is_positive_computed_without_trl(dpo_run, sft_run, sample, tokenizer,
                                                           tiny_model_dir: Path) -> None:
    from peft import PeftModel

    out, stdout = dpo_run
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["resolved"]["reference"] == "adapter disabled"
    assert not (out / "ref").exists()  # TRL's second "ref" adapter is not kept, nor saved
    policy = PeftModel.from_pretrained(sft_merged_base(tiny_model_dir, sft_run), str(out)).eval()
    margins = []
    for row in map(json.loads, sample["held"].read_text().splitlines()):
        prompt, chosen, rejected = plain_pair_ids(tokenizer, row)
        pc, pr = answer_logp(policy, prompt, chosen), answer_logp(policy, prompt, rejected)
        with policy.disable_adapter():  # the reference: the SFT model the adapter was trained on
            rc, rr = answer_logp(policy, prompt, chosen), answer_logp(policy, prompt, rejected)
        margins.append((pc - rc) - (pr - rr))
    mean = sum(margins) / len(margins)
    accuracy = sum(m > 0 for m in margins) / len(margins)
    assert mean > 0 and accuracy > 0.5, margins
    final = manifest["eval"]["final_metrics"]
    # TRL's own held-out numbers agree with the independent ones (rewards are beta times the log-ratios).
    assert final["eval_rewards/margins"] == pytest.approx(BETA * mean, rel=1e-3, abs=1e-4)
    assert final["eval_rewards/accuracies"] == pytest.approx(accuracy)
    assert "reward margin" in " ".join(stdout.split())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert all(k in train[-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"))
    assert any("eval_rewards/margins" in r for r in records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert f"train/{name}" in tags and f"eval/{name}" in tags, tags  # TensorBoard got them too


def test_sft_then_dpo_is_recorded_as_a_chain(dpo_run, sft_run) -> None:
    out, stdout = dpo_run
    resolved = read_manifest(out)["resolved"]
    assert [s.get("model") or s.get("run") for s in resolved["chain"]] == ["builtin:tiny-llama", str(sft_run),
                                                                            str(out)]
    assert [s.get("objective") for s in resolved["chain"][1:]] == ["sft", "dpo"]
    assert resolved["start"]["adapters"] == [str(sft_run)]
    assert "start: builtin:tiny-llama -> " in " ".join(stdout.split())


def test_export_merges_base_sft_and_dpo(dpo_run, sft_run, tmp_path: Path, runner, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = dpo_run
    exported = tmp_path / "merged"
    ok(runner("export", out, "--output", exported))
    model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    want = PeftModel.from_pretrained(sft_merged_base(tiny_model_dir, sft_run), str(out)).merge_and_unload().eval()
    ids = torch.tensor([[1, 450, 3681, 338, 29871, 29906, 29974]]) % model.config.vocab_size
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, want(input_ids=ids).logits, atol=1e-5)
    card = (exported / "README.md").read_text()
    assert "training chain" in card and "dpo" in card


def test_full_dpo_starts_from_the_merged_sft_run(sft_run, sample, tmp_path: Path, runner,
                                                 tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    ok(runner("train", "--objective", "dpo", "--method", "full", "--model", sft_run, "--dataset", sample["train"],
              "--max-steps", 1, "--batch-size", 2, "--seq-length", 96, "--learning-rate", "1e-12", "--output-dir", out))
    assert read_manifest(out)["resolved"]["start"]["adapters"] == [str(sft_run)]
    trained = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    start = sft_merged_base(tiny_model_dir, sft_run).eval()
    ids = torch.tensor([[1, 450, 3681, 338, 29871]]) % trained.config.vocab_size
    with torch.no_grad():  # a step at a negligible learning rate: the saved model is the start, base + SFT merged
        assert torch.allclose(trained(input_ids=ids).logits, start(input_ids=ids).logits, atol=1e-5)


def test_generate_on_the_dpo_run(dpo_run, runner) -> None:
    out, _ = dpo_run
    result = runner("generate", out, "--prompt", "What is 2 + 2?", "--max-new-tokens", 4)
    ok(result)
    assert result.stdout.strip() and re.search(r"\d+ prompt tokens, [1-4] new tokens", result.stderr), result.stderr


# ---- the other methods ----------------------------------------------------------------------------------------


def test_full_with_a_frozen_copy_and_precomputed_reference(tmp_path: Path, sample, runner) -> None:
    common = ["train", "--objective", "dpo", "--method", "full", *TINY, "--dataset", sample["train"],
              "--max-steps", 2, "--batch-size", 4, "--seq-length", 96, "--eval-split", 4]
    ok(runner(*common, "--output-dir", tmp_path / "copy"))
    manifest = read_manifest(tmp_path / "copy")
    assert manifest["resolved"]["reference"] == "frozen copy"
    assert manifest["eval"]["examples"] == 4 and manifest["data"]["rows_used"] == TRAIN - 4  # held-out pairs
    first = runner(*common, "--precompute-ref", "--output-dir", tmp_path / "pre1")
    ok(first)
    assert "computed once and cached" in " ".join(first.stdout.split())
    second = runner(*common, "--precompute-ref", "--output-dir", tmp_path / "pre2")
    ok(second)
    assert "reused from" in " ".join(second.stdout.split())  # a second run does not compute them again
    assert read_manifest(tmp_path / "pre2")["resolved"]["reference"] == "precomputed"
    # The precomputed reference is the frozen copy's numbers: the same losses.
    assert train_losses(tmp_path / "pre2") == pytest.approx(train_losses(tmp_path / "copy"), abs=1e-5)


def test_qlora(tmp_path: Path, sample, runner) -> None:
    out = tmp_path / "run"
    ok(runner("train", "--objective", "dpo", "--method", "qlora", *TINY, "--dataset", sample["train"],
              "--max-steps", 2, "--batch-size", 4, "--seq-length", 96, "--output-dir", out))
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["resolved"]["reference"] == "adapter disabled"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    exported = runner("export", out, "--output", tmp_path / "merged")  # merged into the dequantised base, verified
    ok(exported)
    assert re.search(r"verify: largest logit difference", " ".join(exported.stdout.split()))


def test_fsdp_two_processes(tmp_path: Path, sample) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "ftcli", "train", "--objective", "dpo", "--method", "fsdp", *TINY,
                             "--dataset", str(sample["train"]), "--max-steps", "2", "--batch-size", "2",
                             "--seq-length", "96", "--nproc-per-node", "2", "--master-port", str(port),
                             "--output-dir", str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["resolved"]["processes"] == 2
    assert "rewards/margins" in manifest["log_history"][-1]


# ---- carry-over: SIGTERM + resume, the NaN guard ----------------------------------------------------------------


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_sigterm_then_resume_is_exact(tmp_path: Path, sample, runner) -> None:
    args = ["train", "--objective", "dpo", "--method", "lora", *TINY, "--dataset", str(sample["train"]),
            "--max-steps", "6", "--batch-size", "4", "--seq-length", "96", "--save-steps", "2"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    ok(runner(*args, "--output-dir", reference))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FTCLI_DEBUG_STEP_DELAY": "0.3"}
    proc = subprocess.Popen([sys.executable, "-m", "ftcli", *args, "--output-dir", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        # checkpoint-2 saved (its marker follows on a thread of its own): the signal lands well before the last step
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    command = shlex.split(stderr.split("resume with: ", 1)[1].strip())
    ok(runner(*command[1:]))
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["resumed_from"]["step"] >= 2
    assert losses(out) == losses(reference)
    rewards = (lambda run: [r["rewards/margins"] for r in read_manifest(run)["log_history"]])
    assert rewards(out) == rewards(reference)
    got, want = weights(out), weights(reference)
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)


def test_nan_guard_stops_the_run(tmp_path: Path, sample, runner, monkeypatch) -> None:
    monkeypatch.setenv("FTCLI_DEBUG_NAN_AT_STEP", "2")
    out = tmp_path / "run"
    result = runner("train", "--objective", "dpo", "--method", "lora", *TINY, "--dataset", sample["train"],
                    "--max-steps", 3, "--batch-size", 4, "--seq-length", 96, "--output-dir", out)
    assert result.exit_code == 1 and re.search(r"step 2: the .+ is not finite", result.stderr), result.stderr
    assert read_manifest(out)["status"] == "failed"


def test_memory_estimate_counts_the_reference(runner) -> None:
    reports = {}
    for extra in ([], ["--objective", "dpo"], ["--objective", "dpo", "--precompute-ref"]):
        result = runner("inspect", "builtin:tiny-llama", "--json", "--seq-length", 64, *extra)
        ok(result)
        reports[" ".join(extra)] = {m["method"]: m for m in json.loads(result.stdout)["memory"]["methods"]}
    sft, dpo, pre = reports[""], reports["--objective dpo"], reports["--objective dpo --precompute-ref"]
    assert dpo["full"]["reference"] == "frozen copy" and dpo["full"]["reference_bytes"] == sft["full"]["weights_bytes"]
    assert dpo["lora"]["reference"] == "adapter disabled" and dpo["lora"]["reference_bytes"] == 0
    assert pre["full"]["reference_bytes"] == 0
    assert dpo["lora"]["activations_bytes"] > sft["lora"]["activations_bytes"]  # chosen + rejected
