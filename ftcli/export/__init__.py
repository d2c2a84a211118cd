"""Export: a run or an adapter as one standalone, verified model folder.

    >>> from ftcli.export.run import ExportOptions, export_model
    >>> export_model(ExportOptions(source="runs/lora-1", output="models/lora-1"))

run.py (the export, top to bottom), source.py (what the source is, its base, the merge target),
merge.py (the in-place merge, QLoRA dequantisation, verification logits), staging.py (the
atomic write), modelcard.py (the export record and model card).
"""
