"""lm-evaluation-harness (`lm_eval` from PyPI) as a client of `slm serve`: its `local-completions`
backend scores a multiple-choice task defined in a local YAML and JSONL file (nothing downloaded)
through /v1/completions' echo + logprobs, and gets the same log-likelihoods (1e-4), accuracy and
normalised accuracy as `slm eval` on the same items. lm-eval's API backend sends contexts without
BOS, which is `slm eval --no-bos`."""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys

import pytest

import slm
from slm.eval import evaluate
from support.models import make_checkpoint
from support.server import Server

TASK = """task: arc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_through_the_server_equals_slm_eval(tmp_path, tokenizer_dir):
    model = make_checkpoint(str(tmp_path / "tiny"), "llama", tokenizer_dir, max_position_embeddings=512)
    rng = random.Random(0)
    words = "cat dog sun moon tree river stone bird fish apple bread milk red blue green small big".split()
    items = tmp_path / "items.jsonl"
    with open(items, "w") as f:
        for i in range(24):
            labels = ["A", "B", "C", "D"]
            f.write(json.dumps({"id": f"q{i}", "question": f"Which one is {rng.choice(words)} like {rng.choice(words)}?",
                                "choices": {"text": [" ".join(rng.sample(words, 2)) for _ in labels], "label": labels},
                                "answerKey": rng.choice(labels)}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arc_local.yaml").write_text(TASK.format(items=items))
    server = Server(model, str(tmp_path / "server.log"), "--max-batch", "4")
    try:
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        run = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"model=tiny,base_url={server.url}/v1/completions,tokenizer={model},tokenized_requests=True,"
             "num_concurrent=2,max_retries=1", "--tasks", "arc_local", "--include_path", str(tasks),
             "--output_path", str(tmp_path / "out"), "--log_samples"],
            env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        server.stop()
    (results,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    (samples,) = glob.glob(str(tmp_path / "out" / "*" / "samples_arc_local_*.jsonl"))
    theirs = json.load(open(results))["results"]["arc_local"]
    ours = evaluate(slm.load(model), str(items), "arc", num_fewshot=0, add_bos=False)
    by_doc = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in map(json.loads, open(samples))}
    assert len(by_doc) == 24
    for item in ours["items"]:
        assert by_doc[item["index"]] == pytest.approx(item["loglikelihoods"], abs=1e-4)
    assert theirs["acc,none"] == pytest.approx(ours["metrics"]["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["metrics"]["acc_norm"])
