"""The llama.cpp side of the GGUF check, run as a child process by ftcli.export.gguf.check.

    $ python -m ftcli.export.gguf.llama_worker FOLDER     # FOLDER/job.json in; result.json, logits-N.npy out

For each probe: llama.cpp's ids for the rendered text (as `llama.cpp --jinja` tokenizes a prompt: a BOS the
text starts with is dropped and added back only when the file says so), its logits on the ids training would
have fed the model, and its greedy continuation. The KV cache is float32 (llama.cpp's default is float16),
so the figures are the file's and not that rounding's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(folder: Path) -> None:
    import llama_cpp
    import numpy as np

    job = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    longest = max(len(p["ids"]) for p in job["probes"]) + job["greedy"] + 8
    llm = llama_cpp.Llama(model_path=job["model"], n_ctx=max(64, longest), n_batch=max(64, longest),
                          logits_all=True, verbose=False, n_threads=max(1, min(8, os.cpu_count() or 1)), seed=0,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    rows = []
    for i, probe in enumerate(job["probes"]):
        text, bos = probe["text"], job["bos_token"]
        if job["add_bos"] and bos and text.startswith(bos):
            text = text[len(bos):]
        ids = llm.tokenize(text.encode("utf-8"), add_bos=job["add_bos"], special=True)
        llm.reset()
        llm.eval(probe["ids"])
        np.save(folder / f"logits-{i}.npy", np.array(llm.scores[: len(probe["ids"])], dtype=np.float32))
        greedy = []
        for _ in range(job["greedy"]):
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([greedy[-1]])
        rows.append({"ids": list(ids), "greedy": greedy})
    (folder / "result.json").write_text(json.dumps({"probes": rows}), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
