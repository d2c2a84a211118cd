"""KTO, ORPO and SimPO (`ftcli train --objective kto|orpo|simpo`) through the real CLI on the built-in tiny model.

The sample is test_dpo.py's: prompts are Alpaca instructions, the desirable (chosen) answer a row's real response,
the undesirable (rejected) one the response of one of three pool rows that never appear as prompts. The held-out
rows have prompts and good answers the training never saw, with bad answers from the same pool, so what the
objectives learn (the pool's answers are bad) can show on them. Log-probabilities are computed here with plain
forward passes of transformers/peft models loaded from the saved runs, independently of TRL and of ftcli's data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import losses, read_manifest

TINY = ["--model", "builtin:tiny-llama"]
POOL, TRAIN, HELD = 3, 24, 8
ORPO_BETA, SIMPO_BETA = 0.1, 2.0


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

    def labeled(rows: list[dict]) -> list[dict]:
        # Twice as many desirable rows as undesirable ones: the default weights must balance them.
        out = []
        for i, r in enumerate(rows):
            out.append({"question": r["instruction"] + "\n", "answer": r["output"], "good": True})
            if i % 2 == 0:
                out.append({"question": r["instruction"] + "\n", "answer": pool[i % POOL]["output"], "good": False})
        return out

    folder = tmp_path_factory.mktemp("pref-data")
    return {
        "train": write_jsonl(folder / "train.jsonl", [pair(i, r) for i, r in enumerate(train)]),
        "held": write_jsonl(folder / "held.jsonl", [pair(i, r) for i, r in enumerate(held)]),
        "labeled": write_jsonl(folder / "labeled.jsonl", labeled(train)),
        "labeled_held": write_jsonl(folder / "labeled_held.jsonl", labeled(held)),
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


def ok(result) -> None:
    assert result.exit_code == 0, result.stdout + (result.stderr or "")


@pytest.fixture(scope="module")
def tokenizer():
    from ftcli.models import apply_pad_policy, load_tokenizer

    tok = load_tokenizer("builtin:tiny-llama")
    apply_pad_policy(tok)
    return tok


COLUMNS = ["--columns", "prompt=question,completion=answer,label=good"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, sample, runner) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sft"
    ok(runner("train", "--method", "lora", *TINY, "--dataset", sample["sft"], "--max-steps", 3, "--batch-size", 8,
              "--learning-rate", "5e-3", "--output-dir", out))
    return out


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory, sample, runner, sft_run) -> tuple[Path, str]:
    """LoRA KTO continuing the SFT run, by epochs, on unpaired labeled rows, evaluated on held-out rows (two epochs:
    a KTO step is four forward passes, the policy's and the reference's on the rows and on the KL rows)."""
    out = tmp_path_factory.mktemp("runs") / "kto"
    result = runner("train", "--objective", "kto", "--method", "lora", "--model", sft_run, "--dataset",
                    sample["labeled"], *COLUMNS, "--eval-dataset", sample["labeled_held"], "--num-epochs", 2,
                    "--batch-size", 8, "--learning-rate", "1e-2", "--seq-length", 96, "--output-dir", out)
    ok(result)
    return out, result.stdout


@pytest.fixture(scope="module")
def orpo_run(tmp_path_factory, sample, runner) -> tuple[Path, str]:
    """LoRA ORPO on the base model, by epochs, as a README example would run it."""
    out = tmp_path_factory.mktemp("runs") / "orpo"
    result = runner("train", "--objective", "orpo", "--method", "lora", *TINY, "--dataset", sample["train"],
                    "--num-epochs", 4, "--batch-size", 8, "--learning-rate", "1e-2", "--seq-length", 96,
                    "--output-dir", out)
    ok(result)
    return out, result.stdout


@pytest.fixture(scope="module")
def simpo_run(tmp_path_factory, sample, runner, sft_run) -> tuple[Path, str]:
    """LoRA SimPO continuing the SFT run."""
    out = tmp_path_factory.mktemp("runs") / "simpo"
    result = runner("train", "--objective", "simpo", "--method", "lora", "--model", sft_run, "--dataset",
                    sample["train"], "--num-epochs", 4, "--batch-size", 8, "--learning-rate", "1e-2",
                    "--seq-length", 96, "--output-dir", out)
    ok(result)
    return out, result.stdout


# ---- independent log-probabilities ----------------------------------------------------------------------------


def answer_logps(model, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """The log-probability of each answer token after the prompt: a plain forward pass and log-softmax."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    return logps[torch.arange(len(answer_ids)), torch.tensor(answer_ids)]


def plain_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """A string row as the SFT prompt/completion rules render it: BOS + prompt, the answer + one EOS."""
    tok = (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    return [tokenizer.bos_token_id] + tok(prompt), tok(answer) + [tokenizer.eos_token_id]


def merged(tiny_model_dir: Path, adapter: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return base if adapter is None else PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def held_pair_gaps(model, tokenizer, held: Path, mean: bool = False) -> list[float]:
    """For each held-out pair: the chosen answer's log-probability minus the rejected one's (sum, or mean per
    token)."""
    gaps = []
    for row in map(json.loads, held.read_text().splitlines()):
        (prompt, chosen), (_, rejected) = (plain_ids(tokenizer, row["prompt"], row[side])
                                           for side in ("chosen", "rejected"))
        c, r = answer_logps(model, prompt, chosen), answer_logps(model, prompt, rejected)
        gaps.append(float(c.mean() - r.mean()) if mean else float(c.sum() - r.sum()))
    return gaps


# ---- data: the labeled shape, refusals ------------------------------------------------------------------------


def test_kto_rows_are_rendered_as_dpo_pairs_and_pairs_are_unpaired(tmp_path: Path, runner, tokenizer,
                                                                   sample) -> None:
    from datasets import load_from_disk

    out = tmp_path / "labeled"
    result = runner("prepare", "--objective", "kto", *TINY, "--dataset", sample["labeled"], *COLUMNS,
                    "--seq-length", 96, "--output-dir", out)
    ok(result)
    assert "prepared labeled completions" in result.stdout
    stats = json.loads((out / "ftcli_prepared.json").read_text())["stats"]
    assert (stats["desirable"], stats["undesirable"], stats["paired"]) == (TRAIN, TRAIN // 2, False)
    raw = [json.loads(line) for line in sample["labeled"].read_text().splitlines()]
    want = {(tuple(p), tuple(a)): r["good"] for r in raw for p, a in [plain_ids(tokenizer, r["question"], r["answer"])]}
    got = {(tuple(r["prompt_ids"]), tuple(r["completion_ids"])): r["label"] for r in load_from_disk(str(out))}
    assert got == want  # every row, its masks (prompt apart) and its label, as the plain rendering has them

    pairs = tmp_path / "pairs"
    result = runner("prepare", "--objective", "kto", *TINY, "--dataset", sample["train"], "--seq-length", 96,
                    "--output-dir", pairs)
    ok(result)
    rows = list(load_from_disk(str(pairs)))
    assert sum(r["label"] for r in rows) == TRAIN and len(rows) == 2 * TRAIN
    got = {(tuple(r["prompt_ids"]), tuple(r["completion_ids"])): r["label"] for r in rows}
    for row in map(json.loads, sample["train"].read_text().splitlines()):
        prompt, chosen = plain_ids(tokenizer, row["prompt"], row["chosen"])
        _, rejected = plain_ids(tokenizer, row["prompt"], row["rejected"])
        assert got[(tuple(prompt), tuple(chosen))] is True and got[(tuple(prompt), tuple(rejected))] is False
    manifest = json.loads((pairs / "ftcli_prepared.json").read_text())
    assert manifest["kind"] == "labeled" and manifest["stats"]["paired"] is True


def test_kto_message_rows_use_the_chat_template(tmp_path: Path, runner, tokenizer) -> None:
    from datasets import load_from_disk

    user = {"role": "user", "content": "Name a color."}
    rows = [{"prompt": [user], "completion": [{"role": "assistant", "content": "Blue."}], "label": True},
            {"completion": [user, {"role": "assistant", "content": "Seven."}], "label": False}]
    out = tmp_path / "chat"
    ok(runner("prepare", "--objective", "kto", *TINY, "--dataset", write_jsonl(tmp_path / "chat.jsonl", rows),
              "--seq-length", 64, "--output-dir", out))
    tok = (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt = tok(tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True))
    for row in load_from_disk(str(out)):
        answer = "Blue." if row["label"] else "Seven."
        full = tok(tokenizer.apply_chat_template([user, {"role": "assistant", "content": answer}], tokenize=False))
        assert row["prompt_ids"] == prompt and prompt + row["completion_ids"][:-1] == full
        assert row["completion_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("objective, data, needle", [
    ("kto", "sft", "no labeled completions for --objective kto: it needs 'completion' and 'label'"),
    ("orpo", "sft", "no chosen/rejected pair for --objective orpo"),
    ("simpo", "labeled", "no chosen/rejected pair for --objective simpo"),
])
def test_data_of_the_wrong_shape_is_refused_in_one_line(tmp_path: Path, runner, sample, objective: str, data: str,
                                                        needle: str) -> None:
    result = runner("train", "--objective", objective, "--method", "lora", *TINY, "--dataset", sample[data],
                    "--output-dir", tmp_path / "run")
    assert result.exit_code == 3, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(sample[data]) in lines[0] and "columns found" in lines[0]
    assert "model:" not in result.stdout  # refused before the model loads
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, needle", [
    (["--kto-beta", "0.2"], "--kto-beta applies to --objective kto"),
    (["--objective", "orpo", "--simpo-gamma", "0.5"], "--simpo-gamma applies to --objective simpo"),
    (["--objective", "kto", "--batch-size", "1"], "KTO estimates its KL term"),
    (["--objective", "simpo", "--compile"], "--compile is not available with --objective simpo"),
    (["--objective", "kto", "--method", "lora", "--lora-init", "pissa"], "--lora-init pissa starts the adapter"),
    (["--objective", "orpo", "--train-on-inputs"], "--train-on-inputs puts the prompt in an SFT loss"),
])
def test_options_that_make_no_sense_are_refused(tmp_path: Path, runner, args: list[str], needle: str) -> None:
    result = runner("train", *TINY, "--dataset", "builtin:alpaca-sample", *args, "--output-dir", tmp_path / "r")
    assert result.exit_code == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_memory_estimate_counts_no_reference_for_orpo_and_simpo(runner) -> None:
    reports = {}
    for objective in ("dpo", "kto", "orpo", "simpo"):
        result = runner("inspect", "builtin:tiny-llama", "--json", "--seq-length", 64, "--objective", objective)
        ok(result)
        reports[objective] = {m["method"]: m for m in json.loads(result.stdout)["memory"]["methods"]}
    for objective in ("orpo", "simpo"):
        full = reports[objective]["full"]
        assert full["reference"] == "none" and full["reference_bytes"] == 0
        assert any("no reference model" in note for note in full["notes"]), full["notes"]
        assert full["total_bytes"] < reports["dpo"]["full"]["total_bytes"]
    assert reports["kto"]["full"]["reference"] == "frozen copy"
    assert reports["kto"]["full"]["reference_bytes"] == reports["dpo"]["full"]["reference_bytes"] > 0


# ---- training ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kto_raises_desirable_over_undesirable_on_held_out_rows(kto_run, sft_run, sample, tokenizer, runner,
                                                               tiny_model_dir: Path) -> None:
    from peft import PeftModel

    out, stdout = kto_run
    assert "KTO weights: desirable 1, undesirable 2 (balanced for the counts: 24 desirable, 12 undesirable rows)" \
        in " ".join(stdout.split())
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["resolved"]["reference"] == "adapter disabled"
    assert manifest["resolved"]["chain"][1]["run"] == str(sft_run)
    assert not (out / "ref").exists()  # TRL's second "ref" adapter is neither kept nor saved
    policy = PeftModel.from_pretrained(merged(tiny_model_dir, sft_run), str(out)).eval()
    shifts: dict[bool, list[float]] = {True: [], False: []}
    for row in map(json.loads, sample["labeled_held"].read_text().splitlines()):
        prompt, answer = plain_ids(tokenizer, row["question"], row["answer"])
        trained = float(answer_logps(policy, prompt, answer).sum())
        with policy.disable_adapter():  # the reference: the SFT model the adapter was trained on
            start = float(answer_logps(policy, prompt, answer).sum())
        shifts[row["good"]].append(trained - start)
    gap = sum(shifts[True]) / len(shifts[True]) - sum(shifts[False]) / len(shifts[False])
    assert gap > 0, shifts
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(k in records[-1] for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"))
    final = manifest["eval"]["final_metrics"]
    assert final["eval_rewards/margins"] > 0
    summary = " ".join(stdout.split())  # the summary's eval line: KTO has no accuracy, its KL estimate instead
    assert f"reward margin {final['eval_rewards/margins']:.4f}, KL {final['eval_kl']:.4f}" in summary
    assert "nan%" not in summary
    # `ftcli eval RUN` scores the run's own held-out rows with KTO's trainer: the run's final eval numbers again.
    result = runner("eval", out, "--json")
    ok(result)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["objective"] == "kto" and report["reference"] == "adapter disabled" and report["pairs"] == 12
    assert report["loss"] == pytest.approx(manifest["eval"]["final_loss"], rel=1e-4, abs=1e-6)
    for name in ("rewards/margins", "rewards/chosen", "rewards/rejected", "kl"):
        assert report[name] == pytest.approx(final[f"eval_{name}"], rel=1e-4, abs=1e-6), name
    assert report["rewards/accuracies"] is None  # KTO's rows are not pairs


@pytest.mark.slow
def test_orpo_raises_the_chosen_answer_on_held_out_pairs_without_a_reference(orpo_run, sample, tokenizer, runner,
                                                                             tiny_model_dir: Path) -> None:
    out, stdout = orpo_run
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and "reference" not in manifest["resolved"]
    assert manifest["metrics"]["steps"] == 4 * TRAIN // 8  # by epochs
    start = held_pair_gaps(merged(tiny_model_dir, None), tokenizer, sample["held"], mean=True)
    trained = held_pair_gaps(merged(tiny_model_dir, out), tokenizer, sample["held"], mean=True)
    assert sum(trained) / HELD > sum(start) / HELD, (start, trained)
    # `ftcli eval` on the held-out pairs: ORPO's rewards are beta x the mean log-probability per answer token.
    result = runner("eval", out, "--dataset", sample["held"], "--json")
    ok(result)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["objective"] == "orpo" and report["reference"] is None and report["pairs"] == HELD
    assert report["rewards/margins"] == pytest.approx(ORPO_BETA * sum(trained) / HELD, rel=1e-3, abs=1e-5)
    assert report["rewards/accuracies"] == pytest.approx(sum(g > 0 for g in trained) / HELD)


@pytest.mark.slow
def test_simpo_raises_the_chosen_answer_and_exports(simpo_run, sft_run, sample, tokenizer, runner, tmp_path: Path,
                                                    tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    out, _ = simpo_run
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and "reference" not in manifest["resolved"]
    assert manifest["resolved"]["chain"][1]["run"] == str(sft_run)
    start = held_pair_gaps(merged(tiny_model_dir, sft_run), tokenizer, sample["held"])
    exported = tmp_path / "merged"
    ok(runner("export", out, "--output", exported))
    model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    trained = held_pair_gaps(model, tokenizer, sample["held"])
    assert sum(trained) / HELD > sum(start) / HELD, (start, trained)
    card = (exported / "README.md").read_text()
    assert "| objective | simpo (simpo_beta 2.0, simpo_gamma 1.0, cpo_alpha 0.0" in card and "reference: none" in card


@pytest.mark.slow
def test_orpo_resume_continues_as_one_run(tmp_path: Path, sample, runner) -> None:
    common = ["train", "--objective", "orpo", "--method", "lora", *TINY, "--dataset", sample["train"],
              "--batch-size", 4, "--learning-rate", "1e-2", "--seq-length", 64, "--save-steps", 2,
              "--lr-scheduler", "constant"]  # the same schedule whether the goal is 2 or 4 steps
    ok(runner(*common, "--max-steps", 4, "--output-dir", tmp_path / "whole"))
    ok(runner(*common, "--max-steps", 2, "--output-dir", tmp_path / "parts"))
    result = runner(*common, "--max-steps", 4, "--resume", "--output-dir", tmp_path / "parts")
    ok(result)
    assert read_manifest(tmp_path / "parts")["resumed_from"]["step"] == 2
    assert losses(tmp_path / "parts") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
