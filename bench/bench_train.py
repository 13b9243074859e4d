"""Trainer throughput from shards against the same model fed from in-memory batches.

    .venv/bin/python bench/bench_train.py [--captions 200] [--steps 30] [--batch-size 4]
        [--num-workers 0] [--device cpu|cuda] [--preset tiny|small|qwen2-0.5b]

Builds a corpus of captioned images (1.2's pool: tiles through the vision encoder), trains
stage 1.2 with the real loader (WebDataset over the shards, chat template, decode, collate),
and then runs the same number of steps on the same batches held in memory: the data-free
ceiling. Reports tokens/s, samples/s, the fraction of step time spent waiting for data, and
peak memory. The first two steps of each run are warm-up and not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402

from flows.build import build  # noqa: E402
from schemas.config import load_config  # noqa: E402
from schemas.recipes import load_recipes  # noqa: E402
from training.config import ModelConfig, RunConfig  # noqa: E402
from training.data import LoaderSettings, StageLoader, list_shards  # noqa: E402
from training.loop import build_start, freeze, train  # noqa: E402
from training.stages import plan_for  # noqa: E402
from training.template import ChatTemplate  # noqa: E402

from test_stages_report import mixed_corpus  # noqa: E402

PRESETS = {
    "tiny": {},
    "small": dict(patch_size=28, vision_hidden=128, vision_layers=2, vision_heads=4, llm_hidden=256,
                  llm_layers=4, llm_heads=8, llm_kv_heads=2, llm_intermediate=768),
    # the LLM shape of Qwen2-0.5B (random weights), the vision encoder kept small
    "qwen2-0.5b": dict(patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
                       llm_hidden=896, llm_layers=24, llm_heads=14, llm_kv_heads=2,
                       llm_intermediate=4864, bpe_vocab_size=8000),
}


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ceiling(shards: Path, run: Path, cfg: ModelConfig, args: argparse.Namespace) -> dict[str, float]:
    """The same model, plan and batches, with the batches already in memory."""
    plan = plan_for("1.2", load_recipes())
    files = list_shards(shards)
    torch.manual_seed(0)
    model, tok, mcfg, _ = build_start(run, plan, files, cfg, None)
    params = freeze(model, plan)
    use_cuda = args.device == "cuda"
    device = torch.device("cuda" if use_cuda else "cpu")
    model.to(device)
    opt = torch.optim.AdamW(params, lr=1e-4)
    loader = StageLoader(files, ChatTemplate(tok, mcfg.tokens_per_tile),
                         LoaderSettings("lm", args.batch_size, 2048, 0, 64))
    it = iter(loader)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(it).items()}
               for _ in range(args.steps)]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda
                else torch.autocast("cpu", enabled=False))
    tokens = samples = 0
    t_total = 0.0
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        with autocast:
            loss = model(b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if use_cuda:
            torch.cuda.synchronize()
        if i >= 2:
            t_total += time.perf_counter() - t0
            tokens += b["tokens"]
            samples += len(b["samples"])
    return {"tokens_per_s": tokens / t_total, "samples_per_s": samples / t_total,
            "data_wait_frac": 0.0, "peak_mb": peak_mb(device)}


def llm_alone(cfg: ModelConfig, vocab: int, args: argparse.Namespace, seq: int) -> float:
    """tokens/s of the same Qwen2 shape on random in-memory tokens, all of it training."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    use_cuda = args.device == "cuda"
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=cfg.llm_hidden, num_hidden_layers=cfg.llm_layers,
        num_attention_heads=cfg.llm_heads, num_key_value_heads=cfg.llm_kv_heads,
        intermediate_size=cfg.llm_intermediate, tie_word_embeddings=False)).to(device)
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (args.batch_size, seq), device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda
                else torch.autocast("cpu", enabled=False))
    t_total, tokens = 0.0, 0
    for i in range(args.steps):
        t0 = time.perf_counter()
        with autocast:
            loss = llm(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if use_cuda:
            torch.cuda.synchronize()
        if i >= 2:
            t_total += time.perf_counter() - t0
            tokens += ids.numel()
    return tokens / t_total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=200)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    args = ap.parse_args()
    cfg = ModelConfig(**PRESETS[args.preset])
    tmp = Path(tempfile.mkdtemp(prefix="vc-train-"))
    try:
        corpus = load_config(mixed_corpus(tmp / "in", args.captions, 0))
        build(corpus, str(tmp / "out"), stages=[r for s, r in load_recipes().items() if s == "1.2"])
        shards = tmp / "out" / "stage_1.2"
        rows = []
        train_metrics: list[dict] = []
        t0 = time.perf_counter()
        train(shards, tmp / "run", RunConfig(stage="1.2", steps=args.steps, batch_size=args.batch_size,
                                             lr=1e-4, num_workers=args.num_workers, device=args.device),
              cfg, skip_validation=True, from_scratch=True, on_step=train_metrics.append)
        wall = time.perf_counter() - t0
        counted = train_metrics[2:]
        t = sum(m["step_s"] for m in counted)
        dev = torch.device("cuda" if args.device == "cuda" else "cpu")
        rows.append(("from shards (real loader)", sum(m["tokens"] for m in counted) / t,
                     sum(len(m["samples"]) for m in counted) / t,
                     sum(m["data_wait_s"] for m in counted) / t, peak_mb(dev)))
        c = ceiling(shards, tmp / "ceiling", cfg, args)
        rows.append(("in-memory batches (ceiling)", c["tokens_per_s"], c["samples_per_s"], 0.0, c["peak_mb"]))
        n_samples = sum(len(m["samples"]) for m in counted)
        seq = max(16, round(sum(m["tokens"] for m in counted) / max(1, n_samples)))
        vocab = json.loads((tmp / "run" / "config.json").read_text())["llm_config"]["vocab_size"]
        llm_tps = llm_alone(cfg, vocab, args, seq)
        rows.append((f"LLM alone, random tokens ({args.batch_size} x {seq})", llm_tps, float("nan"), 0.0,
                     float("nan")))
        print(f"\nstage 1.2, preset {args.preset}, {args.steps} steps of {args.batch_size} samples, "
              f"device {args.device}, {args.num_workers} loader workers, wall {wall:.1f} s")
        print("| feed | tokens/s | samples/s | data wait | peak MB |")
        print("|---|---:|---:|---:|---:|")
        for name, tps, sps, wait, mb in rows:
            print(f"| {name} | {tps:,.0f} | {sps:.1f} | {wait:.1%} | {mb:,.0f} |".replace("nan", "-"))
        print(f"\nloader run / in-memory ceiling, tokens/s: {rows[0][1] / rows[1][1]:.0%}")
        print(f"loader run / LLM alone, tokens/s: {rows[0][1] / rows[2][1]:.0%} (the full model also runs "
              "the vision encoder)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
