"""Checkpoints that can be trusted: completion markers, discovery, rotation and resume checks.

    $ ftcli train --method lora --model builtin:tiny-llama --save-steps 50 --output-dir runs/a
    ^C                                   # finishes the step, saves runs/a/checkpoint-N, prints:
    $ ftcli train --method lora --model builtin:tiny-llama --save-steps 50 --output-dir runs/a --resume

    >>> from ftcli.training.checkpoints import latest_checkpoint
    >>> latest_checkpoint("runs/a")      # the newest *complete* checkpoint folder, or None

The trainer writes a checkpoint folder (`checkpoint-N`: weights or adapter, optimizer, scheduler,
RNG states, trainer state) and resumes from one (`resume_from_checkpoint`: weights, optimizer,
scheduler, RNG, and the position in the data, mid-epoch included). ftcli adds what makes that safe:

- a checkpoint counts only once `ftcli_checkpoint.json` exists in it: written last, after every
  file of the folder is on disk (fsynced), naming each file, its size and its sha256 (markers written
  before format 2 have sizes only); discovery, rotation and `inspect` check the sizes, resume also
  the checksums, refusing a damaged checkpoint before anything changes; discovery, resume,
  rotation and `inspect` trust nothing else (`complete_checkpoints`), so a folder half-written by a
  crash is skipped;
- ftcli's own rotation (`--save-total-limit`) counts complete checkpoints only and never deletes
  the newest one;
- resuming refuses a checkpoint whose method, model, data, batch size, accumulation, seed, number
  of processes, optimizer or schedule settings, learning rate, sequence length, goal (a higher one
  only from a checkpoint that reached its own) or LoRA settings differ from the run's, listing each
  difference, before loading where the data is not involved (`--force` resumes anyway, recording
  the checkpoint's learning rate, which the resumed schedule keeps; a different adapter shape is
  refused even then).

Signals, the non-finite guard and FSDP resume loading live in ftcli/training/guard.py."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from ftcli.data.specs import map_spec
from ftcli.errors import ConfigError, OutputError
from ftcli.files import file_sha256, write_json_atomic
from ftcli.training.checksums import Checksums

MARKER = "ftcli_checkpoint.json"
METRICS_COPY = "ftcli_metrics.jsonl"  # metrics.jsonl up to this checkpoint, restored on resume
PREFIX = "checkpoint-"
MARKER_FORMAT = 2  # 2: sha256 of each file (format 1: sizes only)

# What must not change between a checkpoint and the run that resumes it: each changes what the
# remaining steps compute (the data order, the examples in an optimizer step, the random draws).
IDENTITY_FIELDS = ("method", "model", "data_fingerprint", "batch_size", "gradient_accumulation_steps", "seed",
                   "processes")


# ... and, only in runs that evaluate (a run without an eval set keeps its identity): the held-out split and
# the eval data, which decide the evaluations and so where early stopping stops and which model is best.
EVAL_IDENTITY_FIELDS = ("eval_split", "eval_fingerprint")
# ... and, only in runs with a LoRA variant (DoRA, rsLoRA, another start, trained biases): which one.
LORA_IDENTITY_FIELDS = ("lora_variant",)
SHOWN_WHEN_ABSENT = {"lora_variant": "plain LoRA"}


# ... and the optimizer and schedule, each only when it is not at its default: a checkpoint written before they were
# recorded (whose runs all used the defaults) keeps resuming, as a missing setting is compared as its default.
RECIPE_IDENTITY_FIELDS = ("optim", "lr_scheduler", "warmup_ratio", "warmup_steps", "min_lr_ratio", "decay_ratio",
                          "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon",
                          "neftune_noise_alpha")
# ... and the objective and its options (ftcli/objectives/), the same way: an SFT checkpoint keeps its identity.
OBJECTIVE_IDENTITY_FIELDS = ("objective", "dpo_beta", "dpo_loss", "max_prompt_length", "precompute_ref",
                             "kto_beta", "kto_desirable_weight", "kto_undesirable_weight", "orpo_beta", "simpo_beta",
                             "simpo_gamma", "cpo_alpha")
DEFAULTED_IDENTITY_FIELDS = (*RECIPE_IDENTITY_FIELDS, *OBJECTIVE_IDENTITY_FIELDS)
# ... and, compared where the checkpoint recorded them (ftcli 0.x checkpoints before issue 26 did not): the learning
# rate (a resumed run keeps the checkpoint's schedule), the sequence length (how examples are cut), the goal (how long
# the schedule is: a higher goal only continues a checkpoint that reached its own, "train further"), and for LoRA
# the adapter's shape.
RECORDED_IDENTITY_FIELDS = ("learning_rate", "seq_length", "goal", "lora_rank", "lora_alpha", "lora_dropout",
                            "lora_target_modules")
# What no --force resumes across: the checkpoint's adapter weights and optimizer state only fit an adapter of its shape.
SHAPE_FIELDS = ("lora_rank", "lora_target_modules")
# What a forced resume takes from the checkpoint whatever the command says (the trainer restores the checkpoint's
# scheduler and optimizer learning rates), so the record says the checkpoint's value.
KEPT_FROM_CHECKPOINT = ("learning_rate",)
# Known only once the data is loaded: left out of the check made before loading.
DATA_IDENTITY_FIELDS = ("data_fingerprint", "eval_fingerprint")


def recipe_default(name: str) -> Any:
    from ftcli.config import RunConfig

    return RunConfig.model_fields[name].default


def run_identity(config: Any, data_fingerprint: str, processes: int,
                 eval_fingerprint: str | None = None) -> dict[str, Any]:
    identity = {"method": config.method, "model": local_path_or_id(config.model), "data_fingerprint": data_fingerprint,
                "batch_size": config.batch_size, "gradient_accumulation_steps": config.gradient_accumulation_steps,
                "seed": config.seed, "processes": processes}
    if getattr(config, "eval_split", None) is not None:
        identity["eval_split"] = config.eval_split
    if eval_fingerprint is not None:
        identity["eval_fingerprint"] = eval_fingerprint
    identity.update({name: getattr(config, name) for name in DEFAULTED_IDENTITY_FIELDS
                     if getattr(config, name, recipe_default(name)) != recipe_default(name)})
    from ftcli.methods import METHODS
    from ftcli.methods.variants import describe

    if describe(config):
        identity["lora_variant"] = describe(config)
    identity.update(learning_rate=config.learning_rate, seq_length=config.seq_length, goal=training_goal(config))
    if METHODS[config.method].trains_adapter and not getattr(config, "full_parameters", False):
        identity.update(lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                        lora_target_modules=sorted(config.lora_target_modules or []))
    return identity


def local_path_or_id(ref: Any) -> Any:
    """A model, dataset or file reference as stored: an existing local path made absolute (so a run resumes
    from any working folder), anything else (hub ids, builtin:, globs) as given."""
    if not isinstance(ref, str) or not ref or ref.startswith("builtin:"):
        return ref
    path = Path(ref).expanduser()
    return str(path.absolute()) if path.exists() else ref


# ---- finding checkpoints ----

def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def checkpoint_folders(out: str | Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` folder in `out`, complete or not, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in out.iterdir()]
    return sorted((step, p) for step, p in found if step is not None)


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The completion marker of a checkpoint, or None when the checkpoint is not complete.

    Complete: the marker parses and every file it lists is there with the size it had when saved."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, size in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return marker


def complete_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    return [(step, p) for step, p in checkpoint_folders(out) if read_marker(p) is not None]


def latest_checkpoint(out: str | Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1][1] if done else None


def training_goal(config: Any) -> str:
    """The run's goal in the words the user typed: `--max-steps N` when given, else `--num-epochs E`."""
    return f"--max-steps {config.max_steps}" if config.max_steps is not None else f"--num-epochs {config.num_epochs:g}"


def goal_reached(config: Any, step: int, epoch: float) -> bool:
    """Whether a checkpoint at `step` / `epoch` already reached the goal (the trainer's float epoch, rounded in the
    marker to 6 places, is exactly the number of epochs at the last step of an epoch)."""
    if config.max_steps is not None:
        return step >= config.max_steps
    return epoch >= config.num_epochs - 1e-6


def resolve_resume(resume: str, out: Path) -> Path:
    """`--resume` (latest complete checkpoint in the output folder) or `--resume PATH` -> a complete checkpoint."""
    if resume == "latest":
        found = latest_checkpoint(out)
        if found is None:
            partial = [p.name for _, p in checkpoint_folders(out)]
            detail = f" ({', '.join(partial)} never completed)" if partial else ""
            raise OutputError(f"--resume: no complete checkpoint in {out}{detail}",
                              hint="pass the run's --output-dir, or --resume PATH to a checkpoint folder")
        return found.absolute()
    path = Path(resume).expanduser()
    if path.is_dir() and checkpoint_step(path) is None and latest_checkpoint(path) is not None:
        return latest_checkpoint(path).absolute()  # a run folder: its newest complete checkpoint
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint folder",
                          hint="pass a checkpoint-N folder or a run folder, or a bare --resume for the latest")
    if read_marker(path) is None:
        raise ConfigError(f"--resume {resume} is not a complete checkpoint (no valid {MARKER}: its writing was "
                          "interrupted)", hint="resume from an earlier checkpoint, or a bare --resume for the latest")
    return path.absolute()


def resolve_verified(resume: str, out: Path) -> Path:
    """resolve_resume, then the checkpoint's files checked against their recorded checksums."""
    path = resolve_resume(resume, out)
    verify_checkpoint(path)
    return path


def verify_checkpoint(path: Path) -> None:
    """Refuse (exit 2) a checkpoint whose files no longer match the checksums its marker recorded; a marker
    without checksums (written before format 2) is trusted on its sizes, as read_marker checks them."""
    marker = read_marker(path) or {}
    for name, expected in (marker.get("sha256") or {}).items():
        if file_sha256(path / name) != expected:
            raise ConfigError(f"--resume: checkpoint {path} is damaged: {path / name} does not match the checksum "
                              "recorded when it was saved", hint="resume from an earlier checkpoint with --resume "
                              "PATH/checkpoint-N, or start again")


def check_compatible(checkpoint: Path, identity: dict[str, Any], force: bool, before_loading: bool = False) -> list[str]:
    """The differences `field old -> new` between the checkpoint's run and this one; refused unless `force` (a
    different adapter shape even then). `before_loading`: the data's fingerprints are not known yet, not compared."""
    marker = read_marker(checkpoint) or {}
    saved = dict(marker.get("run", {}))
    saved["model"] = local_path_or_id(saved.get("model"))  # recorded relative by older versions
    identity = {**SHOWN_WHEN_ABSENT, **identity}
    saved = {**SHOWN_WHEN_ABSENT, **saved}
    names = [n for n in (*IDENTITY_FIELDS, *EVAL_IDENTITY_FIELDS, *LORA_IDENTITY_FIELDS)
             if not (before_loading and n in DATA_IDENTITY_FIELDS)]
    diffs = [f"{name} {saved.get(name)!r} -> {identity.get(name)!r}" for name in names
             if saved.get(name) != identity.get(name)]
    for name in DEFAULTED_IDENTITY_FIELDS:
        old, new = saved.get(name, recipe_default(name)), identity.get(name, recipe_default(name))
        if old != new:
            diffs.append(f"{name} {old!r} -> {new!r}")
    recorded = [n for n in RECORDED_IDENTITY_FIELDS if n in saved and saved[n] != identity.get(n)
                and not (n == "goal" and _continues_finished(saved[n], marker))]
    shape = [f"{n} {saved[n]!r} -> {identity.get(n)!r}" for n in recorded if n in SHAPE_FIELDS]
    if shape:
        raise ConfigError(f"--resume {checkpoint}: the adapter's shape differs from the checkpoint's: "
                          f"{'; '.join(shape)}", hint="resume with the checkpoint's LoRA settings (a checkpoint's "
                          "adapter only loads into its own shape), or start a new run from it with --model")
    diffs += [f"{n} {saved[n]!r} -> {identity.get(n)!r}"
              + (" (not applied: a resumed run keeps the checkpoint's schedule)" if n in KEPT_FROM_CHECKPOINT else "")
              for n in recorded]
    if diffs and not force:
        raise ConfigError(f"--resume {checkpoint}: this run differs from the checkpoint's: {'; '.join(diffs)}",
                          hint="resume with the checkpoint's settings, or pass --force to resume anyway "
                               "(the result will not match an uninterrupted run)")
    return diffs


def _continues_finished(saved_goal: Any, marker: dict[str, Any]) -> bool:
    """Whether the checkpoint reached the goal its own run had (`--max-steps N` or `--num-epochs E`): a new goal then
    trains further from a finished point instead of reshaping a schedule midway."""
    from types import SimpleNamespace

    flag, _, value = str(saved_goal).partition(" ")
    try:
        goal = SimpleNamespace(max_steps=int(value) if flag == "--max-steps" else None,
                               num_epochs=float(value) if flag == "--num-epochs" else 0.0)
        return goal_reached(goal, int(marker.get("step", 0)), float(marker.get("epoch", 0.0)))
    except ValueError:
        return False


def resumed_config(config: Any, checkpoint: Path) -> Any:
    """The config a resume from `checkpoint` really trains with: the settings it keeps from the checkpoint
    (KEPT_FROM_CHECKPOINT) as the checkpoint recorded them, so the manifest and ftcli_config.yaml say what was used."""
    saved = (read_marker(checkpoint) or {}).get("run", {})
    update = {name: saved[name] for name in KEPT_FROM_CHECKPOINT if name in saved}
    return config.model_copy(update=update) if update else config


def prune_for_resume(out: Path, step: int) -> list[str]:
    """Before resuming at `step`: drop incomplete folders and those after `step`, which this run rewrites
    (never leave a marked folder that is about to be overwritten). Returns the names removed."""
    removed = []
    for n, path in checkpoint_folders(out):
        if n > step or read_marker(path) is None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


# ---- writing checkpoints ----

def mark_complete(folder: Path, step: int, epoch: float, identity: dict[str, Any],
                  metrics: list[dict[str, Any]], checksums: Checksums | None = None) -> None:
    """Finish a checkpoint the trainer wrote: drop its pickled arguments, add the metrics so far,
    flush everything to disk with the sha256 of each file (what resume checks the contents against; those
    `checksums` already computed as the trainer's files landed, see ChecksumsAsFilesLand), then write the
    marker (itself atomically and durably)."""
    # The trainer pickles its arguments into every checkpoint; nothing reads them back and ftcli ships no pickles.
    (folder / "training_args.bin").unlink(missing_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    with open(folder / METRICS_COPY, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in metrics if r.get("step", 0) <= step)
    files, sums = (checksums or Checksums()).settle(folder)
    marker = {"format": MARKER_FORMAT, "step": step, "epoch": round(epoch, 6), "run": identity, "files": files,
              "sha256": sums}
    write_json_atomic(folder / MARKER, marker, durable=True)


def unmark(folder: Path) -> None:
    """A folder about to be (re)written stops counting as a checkpoint first."""
    (folder / MARKER).unlink(missing_ok=True)


def rotate(out: Path, limit: int | None, keep_step: int | None = None) -> list[str]:
    """Keep the newest `limit` complete checkpoints; remove older ones and incomplete leftovers older than
    the newest complete one. The newest complete checkpoint is never removed, nor the one of `keep_step`
    (--load-best's best model)."""
    done = complete_checkpoints(out)
    if not done:
        return []
    newest = done[-1][0]
    keep = {p for _, p in done[-limit:]} if limit else {p for _, p in done}
    keep |= {p for step, p in done if step == keep_step}
    removed = []
    for step, path in checkpoint_folders(out):
        if path in keep or step >= newest:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def restore_metrics(checkpoint: Path) -> list[dict[str, Any]]:
    """The metrics.jsonl records saved with a checkpoint (the steps before it)."""
    path = checkpoint / METRICS_COPY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


PATH_FLAGS = {"--dataset": "dataset", "--model": "model", "--log-dir": "log_dir", "--eval-dataset": "eval_dataset",
              "--template": "template", "--config": None}


def resume_command(command: list[str], out: Path, config: Any = None) -> str:
    """The command line that resumes this run: the same flags, its output folder, and `--resume`, with every
    local path absolute (the config's, when given) so that it works from any working folder."""
    args, skip = [], False
    for i, arg in enumerate(command):
        if skip:
            skip = False
            continue
        name, eq, value = arg.partition("=")
        if name in ("--output-dir", "--resume") and not eq:
            nxt = command[i + 1] if i + 1 < len(command) else None
            # `--resume` may be bare; `--output-dir` always takes a value.
            skip = nxt is not None and (name == "--output-dir" or not nxt.startswith("-"))
            continue
        if name in ("--output-dir", "--resume", "--overwrite", "--force"):
            continue
        if name in PATH_FLAGS:
            if eq:
                arg = f"{name}={_absolute(name, value, config)}"
            elif i + 1 < len(command):
                args += [arg, _absolute(name, command[i + 1], config)]
                skip = True
                continue
        args.append(arg)
    given = {a.partition("=")[0] for a in args}
    # Paths a --config file gave (relative to where the run started): passed as flags, which override it.
    for flag, key in PATH_FLAGS.items():
        value = getattr(config, key, None) if key and config is not None else None
        if flag not in given and isinstance(value, str) and local_path_or_id(value) != value:
            args += [flag, local_path_or_id(value)]
        elif flag not in given and isinstance(value, list):  # a mixture: each source, its weight kept
            args += [a for spec in value for a in (flag, map_spec(spec, local_path_or_id))]
    return shlex.join([*args, "--output-dir", str(out), "--resume"])


def _absolute(flag: str, value: str, config: Any) -> str:
    key = PATH_FLAGS.get(flag)
    recorded = getattr(config, key, None) if key and config is not None else None
    if isinstance(recorded, list):  # a mixture (ftcli.data.mixture): this source, its weight kept
        return map_spec(value, local_path_or_id)
    return str(local_path_or_id(recorded if isinstance(recorded, str) else value))
