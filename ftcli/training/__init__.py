"""Training: one run from top to bottom, and the pieces it is built from.

    >>> from ftcli.training.run import run_training
    >>> result = run_training(config)          # what `ftcli train` calls

run.py (the run), setup.py (tokenizer, data, model, plan: shared with warmup), trainer.py
(build_trainer), checkpoints.py (markers, discovery, rotation, resume checks), guard.py
(signals, non-finite guard, resume loading), distributed.py, batching.py, progress.py,
launch.py (the ranks), runfolder.py (the run folder's rules), warmup.py (ahead-of-time compile).
Importing the package imports nothing heavy.
"""
