"""What a from-scratch model knows against the minutes it trained: the built-in probes' accuracy and
the validation loss of finished `slm train` runs, drawn against training time, and recorded.

    python benchmarks/train_quality.py RUN [RUN ...] [--plot docs/train_quality.png] [--judge] [--record]

Each RUN is a finished run's folder (metrics.jsonl, config.json, receipt.json). A run's minutes are
its training steps' time, summed from metrics.jsonl (each row's steps x tokens a step / its
tokens per second): evaluations and checkpoints are left out, so runs on the same machine compare
by the time spent learning. A run trained with --max-minutes M decays its learning rate to 0 at M
minutes, so only its last point is an M-minute run; the points before are the same run midway
(on a high learning rate), drawn thinner. --record appends each run's last point to
benchmarks/results/train_quality.jsonl. --judge adds the judge's grades (slm.eval.judge) of the
lessons and stories each model writes, as `make demo` prints them, and gemma-3-270m's perplexity of
its stories against the corpus's own. --held-out also scores each finished model on the held-out
probes (`slm.data.probes.held_out`: the same kinds drawn on another seed, ~520 items), the sample
that corpus and recipe choices are made on.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def curve(run: str) -> dict:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(run, "receipt.json")) as f:
        receipt = json.load(f)
    tokens_per_step = receipt["tokens"]["trained"] / rows[-1]["step"]
    seconds, last_step, points = 0.0, 0, []
    for r in rows:
        seconds += (r["step"] - last_step) * tokens_per_step / r["tokens_per_s"]
        last_step = r["step"]
        if "probes" in r:
            points.append({"minutes": seconds / 60, "step": r["step"], "probes": r["probes"], "val_loss": r["val_loss"]})
    params = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    return {"run": run, "shape": f"{params[1]} layers x {params[0]}, vocabulary {params[2]}", "points": points,
            "wall_minutes": receipt["wall_seconds"] / 60}


def grade(run: str, reader) -> dict:
    """The judge's grades of a finished run's samples, as make demo prints them (slm.demo)."""
    from slm import load
    from slm.demo import corpus_stories, judge_samples
    from slm.eval.judge import perplexity
    grades = judge_samples(load(run))
    right, checked = grades["arithmetic"]
    agree, named = grades["pronouns"]
    out = {"sums_right": [right, checked], "pronouns_agree": [agree, named], "names_per_story": round(grades["names"], 2),
           "corpus_names_per_story": round(grades["corpus_names"], 2), "repetition": round(grades["repetition"], 4)}
    if reader is not None:
        out["gemma_perplexity"] = round(perplexity(reader, grades["texts"]["stories"]), 1)
        out["gemma_perplexity_corpus"] = round(perplexity(reader, corpus_stories()), 1)
    return out


def held_out(run: str) -> dict:
    """The finished model's accuracy on the held-out probes, in all and by kind."""
    from slm import load
    from slm.data.probes import held_out as items, score
    probes = items()
    s = score(load(run), probes)
    print(f"  held-out probes: acc {s['acc']:.3f} of {len(probes)}; "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["by_kind"].items())))
    return {"held_out_probes": round(s["acc"], 3), "held_out_by_kind": {k: round(v, 2) for k, v in s["by_kind"].items()}}


def plot(curves: list[dict], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for c in curves:
        xs = [p["minutes"] for p in c["points"]]
        label = f"{'/'.join(c['run'].rstrip('/').split('/')[-2:])}: {c['shape']}"
        line, = a.plot(xs, [p["probes"] for p in c["points"]], "-", alpha=0.5, label=label)
        a.plot(xs[-1:], [c["points"][-1]["probes"]], "o", color=line.get_color())
        b.plot(xs, [p["val_loss"] for p in c["points"]], "-", alpha=0.5, color=line.get_color(), label=label)
        b.plot(xs[-1:], [c["points"][-1]["val_loss"]], "o", color=line.get_color())
    a.axhline(0.325, color="gray", linestyle="--", label="chance (0.325)")
    a.axhline(0.755, color="tab:red", linestyle=":", label="gemma-3-270m (0.755)")
    a.set_ylim(0, 1)
    a.set_ylabel("built-in probes (acc)")
    b.set_ylabel("validation loss (nats/token)")
    for ax in (a, b):
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("From scratch on the synthetic corpus: dots are finished runs, lines the same runs midway")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--plot", default=None, help="write the figure here")
    p.add_argument("--judge", action="store_true",
                   help="also grade each model's samples (sums, pronouns, names, repetition, gemma's perplexity)")
    p.add_argument("--held-out", action="store_true", help="also score each model on the held-out probes")
    p.add_argument("--record", action="store_true", help="append each run's last point to the results")
    a = p.parse_args()
    curves = [curve(r) for r in a.runs]
    reader = None
    if a.judge:
        from slm import load
        from slm.checkpoint.safetensors_io import CheckpointError
        try:
            reader = load()  # gemma-3-270m, the default model
        except CheckpointError as e:
            print(f"no fluency grade: {e}", file=sys.stderr)
    for c in curves:
        last = c["points"][-1]
        print(f"{c['run']}: {c['shape']}; {last['minutes']:.1f} training minutes ({c['wall_minutes']:.1f} wall), "
              f"step {last['step']}, probes {last['probes']:.3f}, validation loss {last['val_loss']:.3f}")
        grades = grade(c["run"], reader) if a.judge else {}
        if grades:
            print("  judge: " + ", ".join(f"{k} {v}" for k, v in grades.items()))
        if a.held_out:
            grades.update(held_out(c["run"]))
        if a.record:
            from results_log import record
            record("train_quality", run=c["run"], shape=c["shape"], training_minutes=round(last["minutes"], 1),
                   wall_minutes=round(c["wall_minutes"], 1), steps=last["step"], probes=last["probes"],
                   val_loss=last["val_loss"],
                   probes_midway=[[round(q["minutes"], 1), q["probes"]] for q in c["points"][:-1]][::10], **grades)
    if a.plot:
        plot(curves, a.plot)
        print(f"figure: {a.plot}")


if __name__ == "__main__":
    main()
