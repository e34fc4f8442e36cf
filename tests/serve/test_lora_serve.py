"""LoRA adapters served beside their base model (`slm serve --lora NAME=DIR`), against a real
process with the official `openai` client: each request picks the base model or an adapter by its
`model`; two adapters and the base model decoding in one batch each give what they give alone
(greedy tokens and logprobs), and an adapter's reply is what slm's own LoRA layers (finetune/lora.py,
held to PEFT by tests/finetune) generate offline; /v1/models lists the adapters; a bad adapter
folder stops the server with one line."""

from __future__ import annotations

import threading

import openai
import pytest
import torch

import slm
from slm.finetune.lora import apply_lora, load_adapter, lora_layers, save_adapter
from support.cli import cli
from support.models import make_checkpoint
from support.server import Server

PROMPT = [5, 17, 42, 99, 7, 3, 250, 31]  # token ids: the same input to the server and offline
MAX_TOKENS = 40


def make_adapter(base: str, out: str, seed: int, targets: list[str] | None) -> str:
    """A LoRA adapter of `base` with random A and B (B is zero when training starts, which would
    make the adapter the base model), saved as slm finetune saves one."""
    lm = slm.load(base)
    apply_lora(lm.model, targets, r=4, alpha=8.0, seed=seed)
    with torch.no_grad():
        for layer in lora_layers(lm.model).values():
            for b in layer.lora_B.values():
                b.normal_(0, 0.5)
    save_adapter(lm.model, out, base_model=base)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("lora-serve")
    base = make_checkpoint(str(root / "tiny"), "llama", tokenizer_dir)
    adapters = {"poet": make_adapter(base, str(root / "poet"), 1, None),
                "qv": make_adapter(base, str(root / "qv"), 2, ["q_proj", "v_proj"])}
    server = Server(base, str(root / "server.log"), "--max-batch", "4",
                    *[f"--lora={name}={folder}" for name, folder in adapters.items()])
    yield base, adapters, server
    server.stop()


def complete(client, model: str):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=1)
    c = r.choices[0]
    assert r.model == model
    return c.text, c.logprobs.token_logprobs


def test_adapters_and_base_in_one_batch_equal_serving_them_alone(setup):
    base, adapters, server = setup
    client = server.client()
    names = ["tiny", *adapters]
    alone = {m: complete(client, m) for m in names}
    assert server.health()["peak_running"] == 1
    # each adapter changes what the model writes: otherwise equal replies would prove nothing
    assert len({alone[m][0] for m in names}) == len(names)

    together, barrier = {}, threading.Barrier(len(names))

    def run(m):
        barrier.wait()
        together[m] = complete(server.client(), m)
    threads = [threading.Thread(target=run, args=(m,)) for m in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.health()["peak_running"] == len(names)  # the three decoded in one batch
    for m in names:
        assert together[m][0] == alone[m][0], m
        assert together[m][1] == pytest.approx(alone[m][1], abs=1e-4), m


def test_an_adapter_serves_what_slm_lora_generates_offline(setup):
    base, adapters, server = setup
    lm = slm.load(base)
    load_adapter(lm.model, adapters["qv"])
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            tok = int(lm.model(torch.tensor([ids]))[0, -1].argmax())
            if tok in lm.eos_ids:
                break
            ids.append(tok)
    expected = lm.tokenizer.decode(ids[len(PROMPT):], skip_special_tokens=False)
    assert complete(server.client(), "qv")[0] == expected


def test_models_lists_the_adapters_and_unknown_names_are_404(setup):
    base, adapters, server = setup
    client = server.client()
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"tiny", "poet", "qv"}
    assert listed["poet"].model_extra["parent"] == "tiny" and listed["poet"].model_extra["root"] == adapters["poet"]
    with pytest.raises(openai.NotFoundError, match="the adapters 'poet', 'qv'"):
        client.completions.create(model="prose", prompt="hi", max_tokens=2)
    base_vec, poet_vec = (client.embeddings.create(model=m, input="a story").data[0].embedding for m in ("tiny", "poet"))
    assert base_vec != poet_vec  # embeddings go through the adapter too


def test_bad_adapters_stop_the_server_with_one_line(setup, tmp_path, capsys):
    base, adapters, _ = setup
    cases = [(f"x={tmp_path / 'missing'}", "no such adapter folder"),
             (f"tiny={adapters['poet']}", "is the served model's own"),
             ("no-equals-sign", "give NAME=DIR")]
    for arg, said in cases:
        code, err = cli(capsys, "serve", "--model", base, "--port", "0", "--lora", arg)
        lines = err.strip().splitlines()
        assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("slm serve") and said in lines[0], err
