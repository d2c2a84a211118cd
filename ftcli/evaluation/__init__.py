"""Held-out evaluation: one definition of the eval loss, shared by `train` (its eval steps) and `ftcli eval`.

    >>> from ftcli.evaluation.loss import evaluate_loss
    >>> result = evaluate_loss(model, eval_dataset, batch_size=8)
    >>> result.loss, result.perplexity, result.tokens

`loss` holds the definition (token-weighted mean over every loss token of the eval set, on every
process); `target` reads what `ftcli eval TARGET` points at; `run` is the `ftcli eval` command body.
"""
