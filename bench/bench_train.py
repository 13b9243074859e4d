"""Trainer throughput from shards against the same model fed from in-memory batches, and
packing against padded batches.

    .venv/bin/python bench/bench_train.py [--captions 200] [--qa 200] [--steps 30]
        [--batch-size 4] [--max-len 2048] [--num-workers 0] [--device cpu|cuda]
        [--preset tiny|small|qwen2-0.5b] [--tower builtin|siglip-so400m|internvit-300m]
        [--pack] [--fsdp] [--corpus OUT | --build-corpus OUT]

Builds a corpus of captioned images and text QA of varied lengths. Table 1: stage 1.2 (captions: tiles through
the vision encoder) trained with the real loader (WebDataset over the shards, chat template,
decode, collate), then the same number of steps on the same batches held in memory (the
data-free ceiling), then the same Qwen2 shape alone on random in-memory tokens. Table 2:
stage 1.3 (QA and captions, so lengths vary a lot): --batch-size packed rows of up to --max-len
tokens a step against padded, length-bucketed batches of as many samples as the packed rows
held, so both steps carry about the same tokens.
Reports tokens/s (real tokens, not padding), samples/s, the padding fraction, the share of
step time spent waiting for data, and peak memory. The first two steps of each run are
warm-up and not counted.

`--tower` puts a random pretrained-shaped vision tower in the built-in encoder's place (saved
to a temporary folder and loaded through `vision_path`, as a user's would be): SigLIP-so400m's
shape (width 1152, 27 layers, patch 14) or InternViT-300M's (width 1024, 24 layers, patch 14),
both at 448 px. These are GPU sizes.

`--build-corpus OUT` only builds that corpus into OUT (stages 1.2 and 1.3) and exits; `--corpus
OUT` trains from such a folder instead of building one (the device machine carries the built
shards and only the trainer's packages: bench/gpu_checks.sh).
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

from schemas.recipes import load_recipes  # noqa: E402
from training.config import ModelConfig, RunConfig  # noqa: E402
from training.data import LoaderSettings, StageLoader, list_shards  # noqa: E402
from training.loop import build_start, freeze, train  # noqa: E402
from training.stages import plan_for  # noqa: E402
from training.template import ChatTemplate  # noqa: E402

PRESETS = {
    "tiny": {},
    "small": dict(patch_size=28, vision_hidden=128, vision_layers=2, vision_heads=4, llm_hidden=256,
                  llm_layers=4, llm_heads=8, llm_kv_heads=2, llm_intermediate=768),
    # the LLM shape of Qwen2-0.5B (random weights), the vision encoder kept small
    "qwen2-0.5b": dict(patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
                       llm_hidden=896, llm_layers=24, llm_heads=14, llm_kv_heads=2,
                       llm_intermediate=4864, bpe_vocab_size=8000),
}
# random towers of real models' shapes, at the tiles' 448 px
TOWERS = {
    "siglip-so400m": ("siglip", dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                     num_attention_heads=16)),
    "internvit-300m": ("clip", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                    num_attention_heads=16)),
}


def save_tower(name: str, folder: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    kind, shape = TOWERS[name]
    torch.manual_seed(0)
    if kind == "siglip":
        SiglipVisionModel(SiglipVisionConfig(image_size=448, patch_size=14, **shape)).save_pretrained(folder)
        norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    else:  # InternViT-300M's shape (a CLS token, ImageNet normalisation) through CLIP's classes
        CLIPVisionModel(CLIPVisionConfig(image_size=448, patch_size=14, **shape)).save_pretrained(folder)
        norm = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (folder / "preprocessor_config.json").write_text(json.dumps(norm))
    return folder


def varied_corpus(root: Path, n_caption: int, n_qa: int, seed: int = 0) -> Path:
    """Captions over images of random shapes (1 to 13 tiles) and QA with answers of 1 to 120
    words: lengths that vary as a real mix's do (seeded)."""
    import random

    import yaml

    from conftest import write_image

    rng = random.Random(seed)
    words = "the a red blue square circle of on under picture shows three small large near".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n)) + "."

    root.mkdir(parents=True, exist_ok=True)
    caps = []
    for i in range(n_caption):
        size = (rng.randint(40, 160), rng.randint(30, 120))
        write_image(root / "img" / f"{i}.jpg", size, seed=i)
        caps.append({"id": f"c{i}", "image": f"img/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": text(rng.randint(3, 60))}]})
    qa = [{"id": f"q{i}", "conversations": [
        {"from": "human", "value": text(rng.randint(4, 30))},
        {"from": "gpt", "value": text(rng.randint(1, 120))}]} for i in range(n_qa)]
    (root / "cap.json").write_text(json.dumps(caps))
    (root / "qa.json").write_text(json.dumps(qa))
    cfg = {"name": "varied", "seed": seed, "shard": {"max_samples": 50}, "sources": [
        {"name": "cap", "kind": "caption", "format": "llava", "path": "cap.json"},
        {"name": "qa", "kind": "qa", "format": "llava", "path": "qa.json"}]}
    (root / "corpus.yaml").write_text(yaml.safe_dump(cfg))
    return root / "corpus.yaml"


def build_corpus(out: Path, n_caption: int, n_qa: int, inputs: Path | None = None) -> Path:
    """The varied corpus built into out (stages 1.2 and 1.3); its inputs beside it by default."""
    from flows.build.pipeline import build
    from schemas.config import load_config

    corpus = load_config(varied_corpus(inputs or out.parent / f"{out.name}-inputs", n_caption, n_qa))
    build(corpus, str(out), stages=[r for s, r in load_recipes().items() if s in ("1.2", "1.3")])
    return out


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_config(stage: str, args: argparse.Namespace, pack: bool, batch_size: int) -> RunConfig:
    return RunConfig(stage=stage, steps=args.steps, batch_size=batch_size, max_len=args.max_len,
                     lr=1e-4, num_workers=args.num_workers, device=args.device, pack=pack,
                     fsdp=args.fsdp)


def from_shards(shards: Path, run: Path, cfg: ModelConfig, args: argparse.Namespace, stage: str,
                pack: bool, batch_size: int | None = None) -> dict[str, float]:
    """The real loader and training loop; figures over the steps after the warm-up."""
    dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    reset_peak(dev)
    rows: list[dict] = []
    t0 = time.perf_counter()
    train(shards, run, run_config(stage, args, pack, batch_size or args.batch_size), cfg,
          skip_validation=True, from_scratch=True, on_step=rows.append)
    wall = time.perf_counter() - t0
    counted = rows[2:]
    t = sum(m["step_s"] for m in counted)
    tokens = sum(m["tokens"] for m in counted)
    samples = sum(len(m["samples"]) for m in counted)
    return {"tokens_per_s": tokens / t, "samples_per_s": samples / t,
            "data_wait_frac": sum(m["data_wait_s"] for m in counted) / t,
            "padding": 1 - tokens / sum(m["tokens"] / (1 - m.get("padding", 0.0)) for m in counted),
            "tokens_per_step": tokens / len(counted), "samples_per_step": samples / len(counted),
            "peak_mb": peak_mb(dev), "wall_s": wall}


def ceiling(shards: Path, run: Path, cfg: ModelConfig, args: argparse.Namespace) -> dict[str, float]:
    """The same model, plan and batches, with the batches already in memory (one process, no
    FSDP: the data-free step)."""
    plan = plan_for("1.2", load_recipes())
    files = list_shards(shards)
    torch.manual_seed(0)
    model, tok, mcfg, _ = build_start(run, plan, files, cfg, None)
    params = freeze(model, plan)
    use_cuda = args.device == "cuda"
    device = torch.device("cuda" if use_cuda else "cpu")
    reset_peak(device)
    model.to(device)
    opt = torch.optim.AdamW(params, lr=1e-4)
    loader = StageLoader(files, ChatTemplate(tok, mcfg.tokens_per_tile),
                         LoaderSettings("lm", args.batch_size, args.max_len, 0, 64, pack=args.pack))
    it = iter(loader)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(it).items()}
               for _ in range(args.steps)]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda
                else torch.autocast("cpu", enabled=False))
    tokens = samples = 0
    t_total = 0.0
    padding = []
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
            padding.append(b["padding"])
    return {"tokens_per_s": tokens / t_total, "samples_per_s": samples / t_total,
            "data_wait_frac": 0.0, "padding": sum(padding) / len(padding), "peak_mb": peak_mb(device)}


def llm_alone(cfg: ModelConfig, vocab: int, args: argparse.Namespace, seq: int, rows: int) -> float:
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
    ids = torch.randint(0, vocab, (rows, seq), device=device)
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


def _row(name: str, r: dict[str, float]) -> str:
    def f(key: str, fmt: str) -> str:
        v = r.get(key)
        return "-" if v is None or v != v else format(v, fmt)

    return (f"| {name} | {f('tokens_per_s', ',.0f')} | {f('samples_per_s', '.1f')} | "
            f"{f('padding', '.1%')} | {f('data_wait_frac', '.1%')} | {f('peak_mb', ',.0f')} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=200)
    ap.add_argument("--qa", type=int, default=200, help="text QA records (stage 1.3's mixed lengths)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4, help="samples per step; packed: rows per step")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--tower", default="builtin", choices=["builtin", *TOWERS])
    ap.add_argument("--pack", action="store_true", help="table 1 with packed rows too")
    ap.add_argument("--fsdp", action="store_true", help="the shard runs under FSDP (one process)")
    ap.add_argument("--corpus", type=Path, default=None,
                    help="train from this built corpus (made by --build-corpus) instead of building")
    ap.add_argument("--build-corpus", type=Path, default=None,
                    help="only build the corpus into this folder, then exit")
    args = ap.parse_args()
    if args.build_corpus:
        build_corpus(args.build_corpus, args.captions, args.qa)
        print(f"built {args.build_corpus}/stage_1.2 and stage_1.3")
        return
    tmp = Path(tempfile.mkdtemp(prefix="vc-train-"))
    try:
        settings = dict(PRESETS[args.preset])
        if args.tower != "builtin":
            settings["vision_path"] = str(save_tower(args.tower, tmp / "tower"))
            for k in ("patch_size", "vision_hidden", "vision_layers", "vision_heads"):
                settings.pop(k, None)  # the tower's folder decides these
        cfg = ModelConfig(**settings)
        corpus_out = args.corpus or build_corpus(tmp / "out", args.captions, args.qa, tmp / "in")
        s12 = corpus_out / "stage_1.2"
        main_run = from_shards(s12, tmp / "run", cfg, args, "1.2", args.pack)
        c = ceiling(s12, tmp / "ceiling", cfg, args)
        seq = max(16, round(main_run["tokens_per_step"] / max(1.0, main_run["samples_per_step"])))
        rows = args.batch_size
        if args.pack:  # the LLM alone on rows as long as the packed ones
            seq = round(main_run["tokens_per_step"] / args.batch_size)
        vocab = json.loads((tmp / "run" / "config.json").read_text())["llm_config"]["vocab_size"]
        llm = {"tokens_per_s": llm_alone(cfg, vocab, args, seq, rows)}
        s13 = corpus_out / "stage_1.3"
        packed = from_shards(s13, tmp / "run_packed", cfg, args, "1.3", True)
        # padded batches of as many samples as the packed rows held: the same tokens a step
        per_step = max(1, round(packed["samples_per_step"]))
        padded = from_shards(s13, tmp / "run_padded", cfg, args, "1.3", False, per_step)

        head = ("| feed | tokens/s | samples/s | padding | data wait | peak MB |\n"
                "|---|---:|---:|---:|---:|---:|")
        print(f"\nstage 1.2, preset {args.preset}, tower {args.tower}, {args.steps} steps of "
              f"{args.batch_size} {'packed rows' if args.pack else 'samples'} (max_len {args.max_len}), "
              f"device {args.device}{', FSDP' if args.fsdp else ''}, {args.num_workers} loader workers, "
              f"wall {main_run['wall_s']:.1f} s")
        print(head)
        print(_row("from shards (real loader)", main_run))
        print(_row("in-memory batches (ceiling)", c))
        print(_row(f"LLM alone, random tokens ({rows} x {seq})", llm))
        ratio = main_run["tokens_per_s"] / c["tokens_per_s"]
        print(f"\nloader run / in-memory ceiling, tokens/s: {ratio:.0%}")
        print(f"loader run / LLM alone, tokens/s: {main_run['tokens_per_s'] / llm['tokens_per_s']:.0%} "
              "(the full model also runs the vision encoder)")
        print(f"\nstage 1.3 (QA and captions): {args.batch_size} packed row(s) of up to {args.max_len} "
              f"tokens a step against padded, length-bucketed batches of {per_step} samples (as many "
              "as the packed rows held)")
        print(head)
        print(_row(f"padded batches ({padded['tokens_per_step']:,.0f} tokens a step)", padded))
        print(_row(f"packed rows ({packed['tokens_per_step']:,.0f} tokens a step)", packed))
        print(f"\npacked / padded, tokens/s: {packed['tokens_per_s'] / padded['tokens_per_s']:.0%}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
