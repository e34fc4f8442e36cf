"""Footprint: FLOP counts against a direct count of the model's matmuls, the forecaster against
published training runs, receipts written by real runs, and energy from RAPL counters (a real
powercap tree in a temporary folder, wraparound included) or the labelled estimate without them."""

import json
import os
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from support.models import make_checkpoint

import slm
from slm.cli import main
from slm.model.config import ModelConfig, get_config
from slm.footprint import forecast, track, validation
from slm.footprint.devices import GPUS, find_gpu
from slm.footprint.energy import EnergyMeter, Rapl
from slm.footprint.flops import attention_flops, flops_per_token, matmul_params
from slm.footprint.forecast import LLAMA2_G_PER_KWH, PUBLISHED, TOLERANCE_ALL, implied_mfu
from slm.model import Transformer

SHAPES = {
    "llama-tied": dict(family="llama", tie_embeddings=True),
    "llama-untied": dict(family="llama"),
    "mistral-gqa": dict(family="mistral", num_kv_heads=2),
    "phi": dict(family="phi", partial_rotary_factor=0.5),
    "gemma3": dict(family="gemma3", num_kv_heads=1, head_dim=32, query_pre_attn_scalar=32, tie_embeddings=True),
}


def tiny(name: str) -> Transformer:
    kw = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
              max_seq_len=128)
    cfg = ModelConfig(**{**kw, **SHAPES[name]})
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    return model


def counted(fn) -> int:
    """FLOPs of the matmuls fn runs, counted by PyTorch; attention through the math backend so
    its two matmuls are visible to the counter (the CPU's fused kernel is not)."""
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        fn()
    return fc.get_total_flops()


# -- FLOPs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SHAPES))
def test_matmul_params_are_the_models_matmul_weights(name):
    model = tiny(name)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(model.config) == linear  # blocks + LM head (tied or not), no embedding lookup


@pytest.mark.parametrize("name", list(SHAPES))
def test_flops_per_token_match_a_direct_count(name):
    model, B, T = tiny(name), 2, 48
    x = torch.randint(0, 400, (B, T))
    forward = counted(lambda: model(x))
    assert forward == pytest.approx(B * T * flops_per_token(model.config, T, training=False), rel=1e-3)

    def train_step():
        model(x).float().logsumexp(-1).sum().backward()
    assert counted(train_step) == pytest.approx(B * T * flops_per_token(model.config, T), rel=1e-3)  # 6N + attention


def test_flops_formula_matches_the_training_loops_formula_by_hand():
    cfg = get_config("stories15m")
    n = 6 * (288 * 288 * 4 + 3 * 288 * 768) + 32000 * 288  # per layer: QKVO + SwiGLU; the tied head
    assert matmul_params(cfg) == n
    assert flops_per_token(cfg, 256) == 6 * n + 12 * 6 * 256 * 288  # 6N + 12 L T d (PaLM)


def test_sliding_window_layers_see_at_most_their_window():
    cfg = ModelConfig(family="mistral", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, sliding_window=16, max_seq_len=256)
    assert attention_flops(cfg, 8) == 4 * 2 * 8 * 64
    assert attention_flops(cfg, 100) == 4 * 2 * 16 * 64  # both layers capped at the window
    g = get_config("gemma-3-270m")  # 15 local layers (window 512), 3 global
    assert attention_flops(g, 4096) == 4 * (15 * 512 + 3 * 4096) * 4 * 256


@pytest.mark.parametrize("name", ["llama-tied", "phi"])
def test_watch_counts_what_the_forward_passes_compute(name, tmp_path):
    model = tiny(name).eval()
    cfg = model.config
    x = torch.randint(0, 400, (3, 20))

    def watched(fn) -> tuple[int, float]:
        r = track("eval", path=str(tmp_path / "r.json"), quiet=True, rapl_root=str(tmp_path))
        with r, torch.no_grad():
            handle = r.watch(model)
            fn()
            handle.remove()
        return r.tokens["inferred"], r.flops

    with torch.no_grad():
        for fn in (lambda: model(x), lambda: model(x, last_only=True)):  # last_only: the LM head once per row
            assert watched(fn) == (60, pytest.approx(counted(fn), rel=1e-3))
    pos = torch.arange(20).expand(3, 20).clone()
    pos[0] = torch.tensor([-1] * 5 + list(range(15)))  # a left-padded row: padding is not counted
    head, body = 2 * 400 * 64, 2 * (matmul_params(cfg) - 400 * 64)
    expect = 40 * (body + attention_flops(cfg, 20)) + 15 * (body + attention_flops(cfg, 15)) + 55 * head
    assert watched(lambda: model(x, pos=pos)) == (55, pytest.approx(expect))


# -- the forecaster against published runs ------------------------------------------------------
def test_forecast_validation_table():
    rows = {r["name"]: r for r in validation()}
    assert set(rows) == {p.name for p in PUBLISHED}
    for r in rows.values():
        assert 0.25 < r["implied_mfu"] < 0.70, r  # every published run implies a plausible utilisation
        assert abs(r["gpu_hours_error"]) <= r["tolerance"] <= TOLERANCE_ALL, r
    # the MFUs the table states (README): Llama 2 38-43%, GPT-4 estimate 32-36% as SemiAnalysis says
    assert [round(rows[f"Llama 2 {s}"]["implied_mfu"], 3) for s in ("7B", "13B", "70B")] == [0.391, 0.377, 0.429]
    assert 0.32 <= rows["GPT-4 (estimate)"]["implied_mfu"] <= 0.36
    assert rows["llm.c GPT-2 124M"]["implied_mfu"] == pytest.approx(0.552, abs=0.001)  # 6ND; ~60% with attention
    assert rows["Phi-1"]["implied_mfu"] == pytest.approx(0.461, abs=0.001)
    assert rows["Phi-2"]["implied_mfu"] == pytest.approx(0.626, abs=0.001)
    for s in ("7B", "13B", "70B"):  # CO2 with Meta's assumptions: 400 W, PUE x grid = 423.4 g/kWh
        r = rows[f"Llama 2 {s}"]
        assert abs(r["tco2_error"]) <= 0.10 and r["tco2_error"] == pytest.approx(r["gpu_hours_error"], abs=1e-3)


def test_llama2_carbon_accounting_is_one_factor_for_all_sizes():
    # 31.22 / 62.44 / 291.42 tCO2eq over 184,320 / 368,640 / 1,720,320 GPU-hours at 400 W
    for p in PUBLISHED[1:4]:
        assert p.tco2 * 1e6 / (p.gpu_hours * 0.4) == pytest.approx(LLAMA2_G_PER_KWH, rel=1e-3)
    f = forecast(6.74e9, 2e12, "a100-80gb-sxm", mfu=implied_mfu(6 * 6.74e9 * 2e12, 184_320, "a100-80gb-sxm"),
                 grid=LLAMA2_G_PER_KWH)
    assert f["gpu_hours"] == pytest.approx(184_320) and f["tco2"] == pytest.approx(31.22, rel=1e-3)
    assert f["energy_kwh"] == pytest.approx(184_320 * 0.4)


def test_forecast_reproduces_published_wall_times_at_their_mfu():
    phi2 = forecast(2.7e9, 1.4e12, "a100-80gb-sxm", 96, mfu=0.626)
    assert phi2["wall_days"] == pytest.approx(14, rel=0.01)
    llmc = forecast(124e6, 10e9, "A100-SXM4-80GB", 8, mfu=0.552)
    assert llmc["wall_days"] * 24 * 60 == pytest.approx(90, rel=0.01)
    assert llmc["cost_usd"] == pytest.approx(8 * 1.5 * 1.79, rel=0.01)  # ~$20, as Karpathy's post says
    assert forecast(1, 1, "t4")["peak_flops_per_gpu"] == 65e12  # no bf16 on a T4: its fp16 tensor-core peak


def test_device_table():
    assert set(GPUS) == {"a100-40gb-sxm", "a100-80gb-sxm", "a100-40gb-pcie", "a100-80gb-pcie", "h100-sxm",
                         "h100-pcie", "h200", "l4", "t4", "rtx-4090"}
    for d in GPUS.values():
        assert d.peak["fp32"] < d.peak["fp16"] and d.watts > 0 and d.price_per_hour > 0 and d.source
    names = {"NVIDIA A100-SXM4-80GB": "a100-80gb-sxm", "NVIDIA A100-PCIE-40GB": "a100-40gb-pcie",
             "NVIDIA A100 80GB PCIe": "a100-80gb-pcie", "NVIDIA H100 80GB HBM3": "h100-sxm",
             "NVIDIA H100 PCIe": "h100-pcie", "NVIDIA H200": "h200", "NVIDIA L4": "l4", "Tesla T4": "t4",
             "NVIDIA GeForce RTX 4090": "rtx-4090"}
    for name, key in names.items():
        assert find_gpu(name).key == key
    with pytest.raises(ValueError, match="unknown GPU"):
        find_gpu("NVIDIA L40S")


def test_cost_cli(capsys):
    main(["cost", "--params", "2.7B", "--tokens", "1.4T", "--gpu", "a100-80gb-sxm", "--gpus", "96", "--mfu", "0.626",
          "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["flops"] == pytest.approx(6 * 2.7e9 * 1.4e12) and r["wall_days"] == pytest.approx(14, rel=0.01)
    assert r["tco2"] == pytest.approx(r["energy_kwh"] * 475 / 1e6)  # defaults: PUE 1.0, 475 g/kWh
    main(["cost", "--preset", "slm-124m", "--tokens", "chinchilla", "--gpu", "h100", "--pue", "1.1", "--grid", "50",
          "--price", "2", "--json"])
    r = json.loads(capsys.readouterr().out)
    n = matmul_params(get_config("slm-124m"))
    assert r["params"] == n and r["tokens"] == 20 * n and r["gpu"] == "h100-sxm"
    assert r["tco2"] == pytest.approx(r["energy_kwh"] * 1.1 * 50 / 1e6) and r["cost_usd"] == pytest.approx(2 * r["gpu_hours"])
    main(["cost", "--params", "124M", "--tokens", "10B", "--gpus", "8"])
    out = capsys.readouterr().out
    assert all(k in out for k in ("GPU-hours", "wall time", "kWh", "cost"))
    with pytest.raises(SystemExit):
        main(["cost", "--params", "1B", "--tokens", "1T", "--gpu", "v100"])
    assert "slm cost: error: unknown GPU 'v100'" in capsys.readouterr().err


# -- energy ------------------------------------------------------------------------------------
def zone(path, name: str, uj: int, max_uj: int = 10_000) -> None:
    os.makedirs(path, exist_ok=True)
    for f, v in (("name", name), ("energy_uj", uj), ("max_energy_range_uj", max_uj)):
        with open(os.path.join(path, f), "w") as fh:
            fh.write(f"{v}\n")


def test_rapl_counters_with_wraparound(tmp_path):
    root = tmp_path / "powercap"
    zone(root / "intel-rapl:0", "package-0", 1_000)
    zone(root / "intel-rapl:0" / "intel-rapl:0:0", "core", 500)  # inside the package: not added
    zone(root / "intel-rapl:0" / "intel-rapl:0:1", "dram", 100)  # outside it: added
    os.symlink(root / "intel-rapl:0" / "intel-rapl:0:1", root / "intel-rapl:0:1")  # sysfs lists it twice
    zone(root / "intel-rapl:1", "psys", 7_000)  # the whole platform, packages included: not added
    rapl = Rapl(str(root))
    assert sorted(z.name for z in rapl.zones) == ["intel-rapl:0 (package-0)", "intel-rapl:0:1 (dram)"]
    zone(root / "intel-rapl:0", "package-0", 5_000)
    zone(root / "intel-rapl:0" / "intel-rapl:0:1", "dram", 300)
    rapl.sample()
    zone(root / "intel-rapl:0", "package-0", 500)  # wrapped past max_energy_range_uj = 10,000
    rapl.sample()
    assert rapl.joules == pytest.approx((4_000 + 5_000 + 500 + 200) / 1e6)

    zone(root / "intel-rapl:0", "package-0", 1_000)
    meter = EnergyMeter(8.0, rapl_root=str(root), interval=3600)
    zone(root / "intel-rapl:0", "package-0", 9_000)
    e = meter.stop()
    assert e.method == "measured" and e.joules == pytest.approx(8_000 / 1e6) and "RAPL" in e.how


def test_energy_estimate_when_no_counter_is_readable(tmp_path):
    empty = tmp_path / "no-powercap"
    empty.mkdir()
    before, before_children = time.process_time(), os.times()
    meter = EnergyMeter(8.0, rapl_root=str(empty), interval=3600)
    x, t = torch.randn(256, 256), time.process_time()
    while time.process_time() - t < 0.05:  # some CPU time to account for
        x = torch.tanh(x @ x)
    e = meter.stop()
    after, after_children = time.process_time(), os.times()
    assert e.method == "estimated" and e.joules > 0
    assert f"no RAPL package counters in {empty}" in e.how and "W per busy core" in e.how
    # this process's CPU seconds (process_time, as the meter counts them) and its children's
    cpu_s = after - before + sum(after_children[2:4]) - sum(before_children[2:4])
    assert 0 < e.joules <= cpu_s * 8.0 + 1e-9
    gpu = EnergyMeter(8.0, gpus=[0], gpu_watts=400, rapl_root=str(empty), interval=3600).stop()
    assert gpu.method == "estimated" and "400 W board power (TDP, an upper bound)" in gpu.how


# -- receipts of real runs ---------------------------------------------------------------------
def check_receipt(r: dict, verb: str) -> None:
    assert r["verb"] == verb and r["wall_seconds"] > 0 and r["flops"] > 0
    assert r["energy"]["kwh"] > 0 and r["energy"]["method"] in ("measured", "estimated", "mixed")
    assert r["energy"]["kwh"] == pytest.approx(r["energy"]["joules"] / 3.6e6)
    assert r["co2_g"] == pytest.approx(r["energy"]["kwh"] * r["pue"] * r["grid_g_per_kwh"])
    assert r["cost_usd"] == pytest.approx(r["device_hours"] * r["price_per_device_hour"]) and r["cost_usd"] > 0
    assert r["flops_per_second"] == pytest.approx(r["flops"] / r["wall_seconds"])
    assert 0 < r["mfu"] < 1 and r["device"]["peak_flops_per_device"] > 0


@pytest.mark.slow
def test_training_writes_a_receipt(tmp_path, prepared, monkeypatch, capsys):
    from slm.train.loop import TrainConfig, Trainer
    data, tok = prepared
    monkeypatch.setenv("SLM_RAPL_ROOT", str(tmp_path))  # no counters here: the labelled estimate
    cfg = get_config("slm-1m").replace(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128)
    c = TrainConfig(out=str(tmp_path / "run"), data=data, tokenizer=tok, seq_len=32, batch_size=4, max_steps=3,
                    warmup=1, eval_every=2, eval_batches=2, save_every=10, log_every=1, optimizer="adamw",
                    probes=0)  # the probes' forwards are counted too (test_probes_are_counted_as_inferred_tokens)
    trainer = Trainer(c, cfg)
    trainer.train(progress=False)
    with open(tmp_path / "run" / "receipt.json") as f:
        r = json.load(f)
    check_receipt(r, "train")
    assert r["tokens"] == {"trained": 3 * 4 * 32, "inferred": 2 * 2 * 4 * 32}  # evaluations at steps 2 and 3
    fpt = flops_per_token(trainer.model_cfg, 32)
    assert r["flops"] == pytest.approx(3 * 128 * fpt + 512 * flops_per_token(trainer.model_cfg, 32, False))
    assert r["energy"]["method"] == "estimated" and "CPU core-seconds" in r["energy"]["how"]

    assert "receipt (train)" in capsys.readouterr().out
    c.max_steps = 5  # --resume: the second session is added to the first
    Trainer(c, cfg).train(resume=True, progress=False)
    with open(tmp_path / "run" / "receipt.json") as f:
        r2 = json.load(f)
    check_receipt(r2, "train")
    assert len(r2["sessions"]) == 2 and r2["tokens"]["trained"] == 5 * 128
    assert r2["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in r2["sessions"]))
    assert r2["energy"]["joules"] == pytest.approx(sum(s["energy"]["joules"] for s in r2["sessions"]))

    # With the built-in probes scored at each evaluation, their tokens are inferred tokens too
    from slm.data.probes import probes, score
    from slm.runtime.lm import LM
    c.out, c.probes, c.max_steps = str(tmp_path / "probed"), 2, 3
    trainer = Trainer(c, cfg)
    trainer.train(progress=False)
    probe_tokens = score(LM(trainer.model, trainer.tokenizer), probes(2))["tokens"]
    with open(tmp_path / "probed" / "receipt.json") as f:
        assert json.load(f)["tokens"]["inferred"] == 2 * 2 * 4 * 32 + 2 * probe_tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(str(tmp_path_factory.mktemp("fp") / "tiny"), "llama", tokenizer_dir)


def test_generate_writes_a_receipt_and_compare_draws_it(model_dir, tmp_path, capsys):
    receipts = tmp_path / "receipts"
    main(["generate", "--model", model_dir, "--prompt", "Once upon a time", "--max-new-tokens", "12",
          "--temperature", "0", "--receipt", str(receipts / "gen.json")])
    captured = capsys.readouterr()
    assert "receipt (generate)" in captured.err and "receipt" not in captured.out
    with open(receipts / "gen.json") as f:
        r = json.load(f)
    check_receipt(r, "generate")
    lm = slm.load(model_dir)
    p = len(lm.tokenizer.encode("Once upon a time"))
    assert r["tokens"]["trained"] == 0 and p < r["tokens"]["inferred"] <= p + 12  # prompt + tokens fed back
    assert r["model"]["matmul_params"] == matmul_params(lm.config)

    out = tmp_path / "chart.png"
    main(["cost", "--compare", "--receipts", str(receipts), "--out", str(out)])
    assert f"{len(PUBLISHED)} published runs and 1 receipts" in capsys.readouterr().out
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_serve_writes_a_receipt_when_stopped(model_dir, tmp_path):
    import subprocess
    import sys
    import time
    import urllib.request

    from support.server import free_port
    port = free_port()
    path = tmp_path / "serve.json"
    proc = subprocess.Popen([sys.executable, "-m", "slm", "serve", "--model", model_dir, "--port", str(port),
                             "--receipt", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.2)
        body = json.dumps({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body.encode(),
                                     {"Content-Type": "application/json"})
        usage = json.loads(urllib.request.urlopen(req, timeout=60).read())["usage"]
    finally:
        proc.terminate()  # SIGTERM: uvicorn shuts down, then the receipt is written
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "receipt (serve)" in out, out
    with open(path) as f:
        r = json.load(f)
    check_receipt(r, "serve")
    # the prompt once (prefill), then every sampled token but the last fed back, at most
    assert usage["prompt_tokens"] < r["tokens"]["inferred"] <= usage["prompt_tokens"] + usage["completion_tokens"]
