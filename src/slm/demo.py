"""`make demo`: slm's main job on this machine, with nothing downloaded.

1. synthesize a corpus of simple stories and lessons, train a tokenizer, and train a small
   Llama-style model from scratch on 2 CPU cores, then sample from it;
2. load the result with transformers, unchanged;
3. the real pretrained gemma-3-270m completing a prompt;
4. a short chat with the instruction-tuned SmolLM2-135M-Instruct, as `slm chat` has it.
"""

from __future__ import annotations

import os

import torch

from . import load
from .checkpoint.safetensors_io import CheckpointError
from .model.config import get_config
from .data.probes import summary as probe_summary
from .data.synth import MATH, iter_documents_with_meta
from .eval.judge import arithmetic, judge, perplexity
from .runtime.models import DEFAULT_CHAT_MODEL

LESSON_SAMPLES, STORY_SAMPLES = 20, 10


def judge_samples(lm, seed: int = 0) -> dict:
    """The judge's grades (eval/judge.py) of LESSON_SAMPLES arithmetic lessons and STORY_SAMPLES
    stories the model writes from their first line, sampled as `slm generate` does; the samples
    themselves under "texts" (for the fluency grade, which needs a real model)."""
    lessons = [f"Lesson: {title}\n{intro}\nExercise:" for title, intro, _ in MATH.values()]
    texts = []
    for i in range(LESSON_SAMPLES):
        prompt = lessons[i % len(lessons)]
        texts.append(prompt + lm.generate(prompt, max_new_tokens=100, temperature=0.7, top_k=50, seed=seed + i,
                                          stop=["<|endoftext|>", "\n\n"]))
    stories = [lm.generate("Once upon a time", max_new_tokens=150, temperature=0.7, top_k=50, seed=seed + i,
                           stop=["<|endoftext|>", "\n\n"]) for i in range(STORY_SAMPLES)]
    grades = judge(stories)  # pronouns, names and repetition: of the stories; the sums: of the lessons
    grades["samples"] = {"lessons": len(texts), "stories": len(stories)}
    grades["texts"] = {"lessons": texts, "stories": ["Once upon a time" + t for t in stories]}
    grades["arithmetic"] = list(arithmetic(texts))
    corpus = [d for d, m in iter_documents_with_meta(seed + 1, 10 * STORY_SAMPLES) if m["kind"] == "story"]
    grades["corpus_names"] = judge(corpus)["names"]  # the reference: the cast of the corpus's own stories
    return grades


def corpus_stories() -> list[str]:
    """STORY_SAMPLES of the corpus's own stories (another seed than training's): the fluency grade's
    reference, read by the same real model as the samples."""
    return [d for d, m in iter_documents_with_meta(1, 10 * STORY_SAMPLES) if m["kind"] == "story"][:STORY_SAMPLES]


def main(out: str = "runs/demo", minutes: float = 7.0) -> None:
    print("== 1. Train a small model from scratch on this machine ==")
    print("(slm train: synthesize stories and lessons, train a tokenizer, train a ~2M-parameter Llama; "
          f"{minutes:g} minutes of training)")
    from .data.prepare import build_synthetic, load_tokens
    from .train.loop import TrainConfig, Trainer
    tokens, tok = build_synthetic(os.path.join(out, "data"), 30_000, 2048, seed=0)
    print(f"synthesized 30,000 documents: {len(load_tokens(tokens, 'train')):,} training tokens")
    cfg = get_config("slm-1m").replace(name="demo", hidden_size=192, num_heads=4, num_kv_heads=4, head_dim=48,
                                       num_layers=4, intermediate_size=512, max_seq_len=128)
    c = TrainConfig(out=os.path.join(out, "model"), data=tokens, tokenizer=tok,
                    seq_len=128, batch_size=16, max_steps=100_000, max_minutes=minutes, warmup=20,
                    eval_every=200, save_every=500, log_every=20)  # the default recipe: Muon, WSD
    result = Trainer(c, cfg).train(overwrite=True)
    print(f"validation loss {result['val_loss']:.3f} after {result['steps']} steps "
          f"({result['minutes']:.1f} min); loss and probes: {c.out}/loss.png")
    print(probe_summary(result["probes"]))
    lm = load(c.out)
    for seed, prompt in enumerate(["Once upon a time", "One day, a little girl named", "Lesson: Adding numbers"]):
        print(f"\n--- sample {seed + 1} ---")
        print(prompt + lm.generate(prompt, max_new_tokens=120, temperature=0.7, top_k=50, seed=seed, stop=["<|endoftext|>"]))
    grades = judge_samples(lm)
    right, checked = grades["arithmetic"]
    agree, named = grades["pronouns"]
    print(f"\njudge: {right} of {checked} sums right in {LESSON_SAMPLES} sampled lessons"
          f" ({right / max(checked, 1):.0%}); pronouns agree with the name in {agree} of {named} sentences of "
          f"{STORY_SAMPLES} stories, which name {grades['names']:.1f} children each (the corpus's stories "
          f"{grades['corpus_names']:.1f}); {grades['repetition']:.1%} of 4-grams repeat")

    print("\n== 2. Load it back as Hugging Face does ==")
    try:
        from transformers import AutoModelForCausalLM
        ref = AutoModelForCausalLM.from_pretrained(c.out).eval()
        ids = torch.tensor([lm.tokenizer.encode("Once upon a time")])
        with torch.no_grad():
            diff = (lm.model(ids) - ref(ids).logits).abs().max().item()
        print(f"transformers loads {c.out} unchanged: max |logit difference| = {diff:.2e}")
    except ImportError:
        print("(install transformers to compare logits)")

    print("\n== 3. A real pretrained model: gemma-3-270m (slm generate --prompt ... with no --model) ==")
    try:
        real = load()  # the default model; a line on stderr says which
    except CheckpointError as e:
        print(f"skipped: {e}")
        return
    prompt = "Once upon a time, there was a little"
    print(prompt, end="", flush=True)
    for chunk in real.stream(prompt, max_new_tokens=40, temperature=0):
        print(chunk, end="", flush=True)
    print()
    corpus = corpus_stories()
    print(f"judge, fluency: gemma-3-270m reads the stories of step 1 at perplexity "
          f"{perplexity(real, grades['texts']['stories']):.1f}, the corpus's own at {perplexity(real, corpus):.1f}")

    print("\n== 4. A chat: SmolLM2-135M-Instruct (slm chat, slm serve) ==")
    try:
        chat = load(DEFAULT_CHAT_MODEL)
    except CheckpointError as e:
        print(f"skipped: {e}")
        return
    messages = []
    for question in ["What is the capital of France?", "And of Italy?"]:
        print(f"> {question}")
        messages.append({"role": "user", "content": question})
        reply = []
        for chunk in chat.chat(messages, max_new_tokens=80, stream=True, temperature=0):
            reply.append(chunk)
            print(chunk, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


if __name__ == "__main__":
    main()
