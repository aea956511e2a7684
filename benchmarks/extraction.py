"""Activation-extraction throughput: the project's code path against the reference approach.

    python benchmarks/extraction.py --mode gpu --out benchmarks/results/extraction_h100.json   # on an H100
    python benchmarks/extraction.py --mode cpu --out benchmarks/results/extraction_cpu.json    # here, < 2 min

Workload (fixed, seeded): a Llama-3.2-1B-shaped model built from its config with random weights
(hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 kv heads, head_dim 64, vocab 128256), probe
layer 11; 4,096 sequences with lognormal lengths (median 300 tokens, sigma 0.9, clipped to
[16, 2048]). CPU mode: a small model of the same family (hidden 256, 4 layers) and 256 sequences
(median 100, clipped to [16, 512]).

Methods, in one process and run:
  (a) full model, output_hidden_states=True, batch 16 in corpus order, padded, attention mask
  (b) reference: blocks truncated at the probe layer, a forward hook copies [B, T, H] to the CPU,
      fixed batch 16, length-sorted, masked mean on the CPU afterwards
  (d) the competent baseline, what a good engineer writes in an afternoon: the model truncated at
      the probe layer, length-sorted padded batches filled up to the same token budget as (c),
      SDPA attention with the padding mask, masked mean on the device, only [B, H] copied back
  (c) ctd.model.activations.ActivationExtractor.pool: the code the Ray activation actor runs
      (variants: token budget, torch.compile)
Each method is timed ``--repeats`` times (default 3) after a warm-up; the median is reported, with
every time. Reports tokens/s, model-FLOP utilisation against a bf16 (GPU) / fp32 (CPU) matmul peak
measured in the same run and, on an H100 SXM, against the datasheet's 989 TFLOP/s dense bf16; the
headline ratio (c)/(d), also (c)/(b) and (c)/(a); peak GPU memory (for two corpus sizes); and the
agreement of the pooled vectors of (c) and (d) with (a): the benchmark exits non-zero if they disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ctd.model.activations import ActivationExtractor  # noqa: E402

SHAPES = {
    "gpu": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        layer=11,
        n=4096,
        median=300,
        lo=16,
        hi=2048,
    ),
    "cpu": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=32000,
        layer=3,
        n=256,
        median=100,
        lo=16,
        hi=512,
    ),
}


DATASHEET_PEAK = {"NVIDIA H100 80GB HBM3": 989e12}  # dense bf16, H100 SXM datasheet


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def workload(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(shape["median"]), 0.9, n)), shape["lo"], shape["hi"]).astype(np.int64)
    return [rng.integers(3, shape["vocab_size"], size=int(L), dtype=np.int64).astype(np.int32) for L in lengths]


def build_model(shape, device, dtype, seed=0):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"],
        vocab_size=shape["vocab_size"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaModel(cfg)
    return model.to(dtype).eval()


def flops_per_token(shape, layers):
    h, i, nh, kv, hd = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        shape["head_dim"],
    )
    per_layer = h * nh * hd + 2 * h * kv * hd + nh * hd * h + 3 * h * i
    return 2.0 * per_layer * layers


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype):
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device == "cuda" else 5
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def masked_mean_np(h, lengths):
    return np.stack([h[r, : lengths[r]].mean(0) for r in range(h.shape[0])])


def method_a(model, ids, layer, device, batch=16):
    """Full model with output_hidden_states, batch 16 in corpus order, padded, with mask."""
    n = len(ids)
    out = np.empty((n, model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for s in range(0, n, batch):
            chunk = ids[s : s + batch]
            lens = np.array([len(x) for x in chunk])
            t = lens.max()
            buf = np.zeros((len(chunk), t), np.int64)
            for r, x in enumerate(chunk):
                buf[r, : len(x)] = x
            inp = torch.from_numpy(buf).to(device)
            mask = torch.from_numpy((np.arange(t)[None] < lens[:, None]).astype(np.int64)).to(device)
            hs = model(input_ids=inp, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[layer]
            m = mask[..., None].to(hs.dtype)
            out[s : s + len(chunk)] = ((hs * m).sum(1, dtype=torch.float32) / mask.sum(1, keepdim=True)).cpu().numpy()
    return out


def method_b(model, ids, layer, device, batch=16):
    """Reference: truncated blocks, hook copies [B, T, H] to the CPU, batch 16 sorted by length,
    pooling on the CPU afterwards."""
    full = model.layers
    model.layers = torch.nn.ModuleList(list(full)[:layer])
    captured = {}
    handle = model.layers[layer - 1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("h", (o[0] if isinstance(o, tuple) else o).float().cpu())
    )
    n = len(ids)
    lens_all = np.array([len(x) for x in ids])
    order = np.argsort(-lens_all, kind="stable")
    out = np.empty((n, model.config.hidden_size), np.float32)
    try:
        with torch.inference_mode():
            for s in range(0, n, batch):
                idx = order[s : s + batch]
                lens = lens_all[idx]
                t = lens.max()
                buf = np.zeros((len(idx), t), np.int64)
                for r, i in enumerate(idx):
                    buf[r, : lens[r]] = ids[i]
                mask = torch.from_numpy((np.arange(t)[None] < lens[:, None]).astype(np.int64)).to(device)
                model(input_ids=torch.from_numpy(buf).to(device), attention_mask=mask, use_cache=False)
                out[idx] = masked_mean_np(captured["h"].numpy(), lens)
    finally:
        handle.remove()
        model.layers = full
    return out


def method_d(model, ids, layer, device, token_budget):
    """The competent baseline: truncated model, length-sorted padded batches up to a token budget
    (rows × longest row), SDPA with the padding mask, masked mean on the device."""
    full, norm = model.layers, model.norm
    model.layers = torch.nn.ModuleList(list(full)[:layer])  # hidden_states[layer] = output of block layer - 1
    model.norm = torch.nn.Identity()  # last_hidden_state is normed; hidden_states[layer] is not
    n = len(ids)
    lens_all = np.array([len(x) for x in ids])
    order = np.argsort(-lens_all, kind="stable")
    out = torch.empty((n, model.config.hidden_size), dtype=torch.float32)
    try:
        with torch.inference_mode():
            s = 0
            while s < n:
                t = int(lens_all[order[s]])  # the longest row of the batch (sorted descending)
                rows = max(1, min(n - s, token_budget // t))
                idx = order[s : s + rows]
                lens = lens_all[idx]
                buf = np.zeros((rows, t), np.int64)
                for r, i in enumerate(idx):
                    buf[r, : lens[r]] = ids[i]
                mask = torch.from_numpy((np.arange(t)[None] < lens[:, None]).astype(np.int64)).to(device, non_blocking=True)
                h = model(
                    input_ids=torch.from_numpy(buf).to(device, non_blocking=True), attention_mask=mask, use_cache=False
                ).last_hidden_state
                m = mask[..., None].to(h.dtype)
                pooled = (h * m).sum(1, dtype=torch.float32) / mask.sum(1, keepdim=True)
                out[torch.from_numpy(idx)] = pooled.cpu()
                s += rows
    finally:
        model.layers, model.norm = full, norm
    return out.numpy()


def timed(fn, device, tokens, repeats: int = 1):
    """Median of ``repeats`` timed calls (each after the caller's warm-up); all times are kept."""
    times, peak, res = [], None, None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync(device)
        t = time.perf_counter()
        res = fn()
        sync(device)
        times.append(time.perf_counter() - t)
        if device == "cuda":
            peak = max(peak or 0.0, (torch.cuda.max_memory_allocated() - base) / 2**30)
    dt = float(np.median(times))
    return res, {
        "seconds": round(dt, 3),
        "seconds_each": [round(x, 3) for x in times],
        "tokens_per_s": round(tokens / dt, 1),
        "peak_gpu_mem_gib_above_weights": None if peak is None else round(peak, 3),
    }


def agreement(x, ref):
    rel = np.linalg.norm(x - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    cos = (x * ref).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    return {"max_rel_l2": float(rel.max()), "median_rel_l2": float(np.median(rel)), "min_cosine": float(cos.min())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    ap.add_argument("--sequences", type=int, default=None)
    ap.add_argument("--budgets", default=None, help="comma-separated token budgets for (c)")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off")
    ap.add_argument(
        "--strategies", default="auto", help="comma-separated (c) strategies: packed, padded (auto: what the actor uses)"
    )
    ap.add_argument("--skip", default="", help="comma-separated methods to skip (a,b,d)")
    ap.add_argument("--tolerance", type=float, default=None, help="max relative L2 of (c) vs (a) (default: 5e-2 bf16, 1e-4 fp32)")
    ap.add_argument("--profile", default=None, help="write a torch.profiler kernel table of one (c) call to this file")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (the median is reported)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    shape = SHAPES[args.mode]
    device = "cuda" if args.mode == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--mode gpu needs CUDA")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = args.tolerance or (5e-2 if dtype == torch.bfloat16 else 1e-4)
    n = args.sequences or shape["n"]
    layer = shape["layer"]
    budgets = [int(b) for b in (args.budgets or ("65536,131072,262144" if device == "cuda" else "1024,2048,4096")).split(",")]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    skip = set(filter(None, args.skip.split(",")))

    ids = workload(shape, n)
    tokens = int(sum(len(x) for x in ids))
    fpt = flops_per_token(shape, layer)
    peak = matmul_peak(device, dtype)
    log(
        f"{args.mode}: {n} sequences, {tokens} tokens; {fpt / 1e9:.3f} GFLOP/token; measured matmul peak {peak / 1e12:.1f} TFLOP/s"
    )
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    import transformers

    env["transformers"] = transformers.__version__
    datasheet = DATASHEET_PEAK.get(env["device"]) if device == "cuda" else None
    model = build_model(shape, device, dtype)
    res = {
        "benchmark": "extraction",
        "mode": args.mode,
        "command": "python benchmarks/extraction.py " + " ".join(argv or sys.argv[1:]),
        "environment": env,
        "workload": {**shape, "sequences": n, "tokens": tokens, "sigma": 0.9},
        "flops_per_token": fpt,
        "matmul_peak_flops": peak,
        "datasheet_peak_flops": datasheet,
        "repeats": args.repeats,
        "dtype": str(dtype).replace("torch.", ""),
        "methods": {},
    }

    def record(name, stats):
        stats["mfu"] = round(stats["tokens_per_s"] * fpt / peak, 4)  # against the matmul peak measured here
        if datasheet:
            stats["mfu_datasheet"] = round(stats["tokens_per_s"] * fpt / datasheet, 4)
        res["methods"][name] = stats
        log(
            f"  {name:32s} {stats['tokens_per_s']:>12,.0f} tok/s  MFU {stats['mfu']:.1%}  {stats['seconds']:.2f}s (median of {args.repeats})"
            f"  peak mem {stats['peak_gpu_mem_gib_above_weights']}"
        )

    ref = None
    if "a" not in skip:
        method_a(model, ids[:32], layer, device)  # warm-up
        ref, st = timed(lambda: method_a(model, ids, layer, device), device, tokens, args.repeats)
        record("a_full_output_hidden_states", st)
    if "b" not in skip:
        method_b(model, ids[:32], layer, device)
        _, st = timed(lambda: method_b(model, ids, layer, device), device, tokens, args.repeats)
        record("b_reference_hook_cpu", st)
    if "d" not in skip:
        for budget in budgets:
            method_d(model, ids[:64], layer, device, budget)
            out, st = timed(lambda: method_d(model, ids, layer, device, budget), device, tokens, args.repeats)  # noqa: B023 (called at once)
            st["token_budget"] = budget
            if ref is not None:
                st["agreement_with_a"] = agreement(out, ref)
            record(f"d_baseline_sorted_budget{budget // 1024}k", st)

    # (c): the extractor truncates the model it is given, so it gets the model after (a) and (b).
    strategies = [None] if args.strategies == "auto" else args.strategies.split(",")
    for strategy in strategies:
        for comp in compiles:
            packing = "auto" if strategy is None else strategy == "packed"
            try:
                ex = ActivationExtractor(model, layer, compile=comp, packing=packing)
            except Exception as e:  # record and go on: one failing variant must not lose the run
                res["methods"][f"c_{strategy}{'_compile' if comp else ''}"] = {"error": repr(e)[:500]}
                log(f"  (c) {strategy} compile={comp} failed: {e!r}")
                continue
            for budget in budgets:
                ex.token_budget = budget
                name = f"c_ctd_{ex.strategy}_budget{budget // 1024}k{'_compile' if comp else ''}"
                try:
                    t0 = time.perf_counter()
                    ex.pool(ids[: min(len(ids), 512)])  # warm-up (and compilation)
                    sync(device)
                    warm = time.perf_counter() - t0
                    out, st = timed(lambda: ex.pool(ids)[layer], device, tokens, args.repeats)  # noqa: B023 (called at once)
                except Exception as e:
                    res["methods"][name] = {"error": repr(e)[:500]}
                    log(f"  {name} failed: {e!r}")
                    continue
                st.update({"strategy": ex.strategy, "token_budget": budget, "compile": comp, "warmup_seconds": round(warm, 1)})
                if ref is not None:
                    st["agreement_with_a"] = agreement(out, ref)
                record(name, st)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        ex = ActivationExtractor(model, layer, token_budget=max(budgets), compile=False)
        res["profile_strategy"] = ex.strategy
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            ex.pool(ids[:1024])
            sync(device)
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=40))
        log(f"  profile written to {args.profile}")
    if device == "cuda":
        # Peak memory is bounded by the token budget, not the corpus: the same budget on a quarter
        # of the corpus and on the whole of it.
        best = max(
            (k for k in res["methods"] if k.startswith("c_") and "error" not in res["methods"][k]),
            key=lambda k: res["methods"][k]["tokens_per_s"],
        )
        b = res["methods"][best]["token_budget"]
        comp = res["methods"][best]["compile"]
        ex = ActivationExtractor(model, layer, token_budget=b, compile=comp, packing=res["methods"][best]["strategy"] == "packed")
        mem = {}
        for size in (n // 4, n):
            _, st = timed(lambda: ex.pool(ids[:size]), device, sum(len(x) for x in ids[:size]))  # noqa: B023 (called at once)
            mem[str(size)] = st["peak_gpu_mem_gib_above_weights"]
        res["peak_memory_by_corpus_size"] = {"method": best, "token_budget": b, "peak_gib_above_weights": mem}
        log(f"  peak memory by corpus size ({best}): {mem}")

    c_names = [k for k in res["methods"] if k.startswith("c_") and "error" not in res["methods"][k]]
    if not c_names:
        log("FAIL: no (c) variant ran")
        return 1
    best = max(c_names, key=lambda k: res["methods"][k]["tokens_per_s"])
    res["best_c"] = best
    d_names = [k for k in res["methods"] if k.startswith("d_")]
    if d_names:  # the headline: the project's path against the strongest reasonable baseline
        best_d = max(d_names, key=lambda k: res["methods"][k]["tokens_per_s"])
        res["best_d"] = best_d
        res["ratio_c_over_d"] = round(res["methods"][best]["tokens_per_s"] / res["methods"][best_d]["tokens_per_s"], 3)
    if "b_reference_hook_cpu" in res["methods"]:
        res["ratio_c_over_b"] = round(
            res["methods"][best]["tokens_per_s"] / res["methods"]["b_reference_hook_cpu"]["tokens_per_s"], 3
        )
    if "a_full_output_hidden_states" in res["methods"]:
        res["ratio_c_over_a"] = round(
            res["methods"][best]["tokens_per_s"] / res["methods"]["a_full_output_hidden_states"]["tokens_per_s"], 3
        )
    bad = {
        k: v["agreement_with_a"]
        for k, v in res["methods"].items()
        if "agreement_with_a" in v and v["agreement_with_a"]["max_rel_l2"] > tol
    }
    res["agreement_tolerance_rel_l2"] = tol
    res["agreement_ok"] = not bad
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    log(
        f"best (c): {best}; (c)/(d) = {res.get('ratio_c_over_d')} (headline); (c)/(b) = {res.get('ratio_c_over_b')}; "
        f"(c)/(a) = {res.get('ratio_c_over_a')}; wrote {args.out}"
    )
    if bad:
        log(f"FAIL: pooled vectors of (c) disagree with (a) beyond {tol}: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
