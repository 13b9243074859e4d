"""The trainer on shards built by the demo: every stage, the template, resume, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.build.pipeline import build
from flows.corpora.demo import make_demo_inputs
from flows.validation.gate import validate
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES, MODULES
from training import checkpoint as ckpt
from training.config import ModelConfig, RunConfig, TrainConfigError
from training.loop import TrainingRefused, build_start, train
from training.stages import STAGES, plan_for
from training.template import (
    AUDIO,
    IGNORE,
    IM_END,
    IMAGE,
    ChatTemplate,
    TooLong,
    audio_tokens,
    train_tokenizer,
)

CLI = str(Path(sys.executable).parent / "vita-corpus")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    # Without the parquet, WebDataset, messages and AISHELL sources: the fixed-batch checks
    # below need every stage within one batch of 16 (with them stage 1.3 holds 20 samples).
    cfg = load_config(make_demo_inputs(root / "inputs", shipped=False))
    build(cfg, str(root / "out"), stages=DEFAULT_RECIPES)
    verdicts = validate(str(root / "out"))
    assert all(v["passed"] for v in verdicts.values()), verdicts
    return root / "out"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest(run) / "model.safetensors"))


@pytest.fixture(scope="module")
def chain(demo, tmp_path_factory) -> dict[str, Path]:
    """Every stage in order, each from the previous one's run folder; each batch holds the
    whole (small) demo stage, so every step sees the same samples: a fixed batch."""
    runs: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("runs")
    prev = None
    for stage in STAGES:
        run = root / f"run_{stage}"
        lr = 1e-3 if stage == "3.1" else 3e-3  # the codec diverges at 3e-3 from scratch
        train(demo / f"stage_{stage}", run, RunConfig(stage=stage, steps=12, batch_size=16, lr=lr),
              init=prev)
        runs[stage] = run
        prev = run
    return runs


def _start_weights(stage: str, chain: dict[str, Path], demo: Path) -> dict[str, torch.Tensor]:
    plan = plan_for(stage)
    if plan.previous:
        return weights(chain[plan.previous])
    # stage 1.1 starts from fresh weights: rebuild them the way train() does (same seed)
    from training.data import list_shards

    torch.manual_seed(0)
    model, *_ = build_start(chain[stage], plan, list_shards(demo / f"stage_{stage}"), None, None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_its_modules_and_only_those(stage, chain, demo):
    run = chain[stage]
    plan = plan_for(stage)
    before, after = _start_weights(stage, chain, demo), weights(run)
    assert set(before) == set(after)
    for module in MODULES:
        names = [k for k in after if k.split(".")[0] == module]
        assert names, module
        same = all(torch.equal(before[k], after[k]) for k in names)
        if module in plan.trainable:
            assert not same, f"stage {stage}: {module} should have trained"
        else:
            assert same, f"stage {stage}: {module} is frozen but changed"
    config = json.loads((run / "config.json").read_text())
    assert config["trainable"] == list(plan.trainable)
    assert config["validated"] is True
    verdict = json.loads((run / "verdict.json").read_text())
    assert verdict["passed"] and verdict["shards"]
    if plan.previous:
        assert config["origin"]["init_stage"] == plan.previous


@pytest.mark.parametrize("stage", STAGES)
def test_stage_loss_falls_on_a_fixed_batch(stage, chain):
    rows = metrics(chain[stage])
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert len({tuple(sorted(r["samples"])) for r in rows}) == 1  # the same samples every step
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    # Stages 1.1 and 2.1b train only an adapter under a frozen (here random) LLM: their loss
    # falls slowly; the others fall by half or more in twelve steps.
    assert last < 0.97 * first, (stage, [round(r["loss"], 3) for r in rows])
    assert rows[-1]["loss"] < min(r["loss"] for r in rows[:3]), [round(r["loss"], 3) for r in rows]


def test_state_head_learns_spoken_against_typed(chain):
    rows = metrics(chain["2.2"])
    assert all("state" in r for r in rows)
    assert rows[-1]["state"] < rows[0]["state"]
    assert rows[-1]["state_acc"] == 1.0


def test_chat_template_and_placeholder_expansion():
    tok = train_tokenizer(["Describe the image.", "A red square on a blue field.", "What is it?"], 300)
    tpl = ChatTemplate(tok, tokens_per_tile=16)
    rec = {"conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "A red square on a blue field."},
        {"from": "human", "value": "<audio>\n"},
        {"from": "gpt", "value": "A square."}],
        "meta": {"speech": {"questions": [{"turn": 2, "text": "What is it?"}]}}}
    enc = tpl.encode(rec, tiles=[3], frames=0, audio_samples=[32000])
    ids = enc.input_ids
    assert ids.count(tok.token_to_id(IMAGE)) == 3 * 16
    assert ids.count(tok.token_to_id(AUDIO)) == audio_tokens(32000) == 25  # 2 s at 12.5 Hz
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are an AI robot and your name is VITA.<|im_end|>\n"
                           "<|im_start|>user\n<image>")
    assert "<|im_start|>assistant\nA red square on a blue field.<|im_end|>\n" in text
    trained = [t for t, lab in zip(ids, enc.labels, strict=True) if lab != IGNORE]
    assert tok.decode(trained, skip_special_tokens=False) == (
        "A red square on a blue field.<|im_end|>A square.<|im_end|>")
    assert enc.state_labels == [0, 1]  # the first question typed, the second spoken
    assert [ids[p] for p in enc.state_positions] == [tok.token_to_id(IM_END)] * 2
    video = tpl.encode({"conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                          {"from": "gpt", "value": "It moves."}]},
                       tiles=[], frames=4, audio_samples=[])
    assert video.input_ids.count(tok.token_to_id(IMAGE)) == 4 * 16
    with pytest.raises(TooLong, match="media alone reach past max_len 40"):
        tpl.encode(rec, tiles=[3], frames=0, audio_samples=[32000], max_len=40)  # never cut media
    n = len(enc)
    cut = tpl.encode(rec, tiles=[3], frames=0, audio_samples=[32000], max_len=n - 3)
    assert len(cut) == n - 3 and cut.truncated and cut.state_labels == [0, 1]
    text_only = {"conversations": [{"from": "human", "value": "What is it?"},
                                   {"from": "gpt", "value": "A red square on a blue field. " * 5}]}
    first_answer = next(k for k, lab in enumerate(tpl.encode(text_only, [], 0, []).labels)
                        if lab != IGNORE)
    assert tpl.encode(text_only, [], 0, [], max_len=first_answer + 3).truncated
    with pytest.raises(TooLong, match="no answer token is left"):
        tpl.encode(text_only, [], 0, [], max_len=first_answer)


def test_paper_shapes():
    paper = ModelConfig.paper()
    assert paper.tokens_per_tile == 256  # 448 px, patch 14, 2x2 pixel shuffle
    assert paper.codec_hop == 600 and paper.codec_sample_rate // paper.codec_hop == 40
    assert audio_tokens(16000 * 30) == 375  # 30 s at 12.5 Hz
    with pytest.raises(TrainConfigError, match="patch_size"):
        ModelConfig(patch_size=50)
    with pytest.raises(TrainConfigError, match="unknown model setting"):
        ModelConfig.from_dict({"hiden": 3})


def test_resume_continues_from_the_same_step_and_position(demo, tmp_path):
    shards = demo / "stage_1.3"
    whole = tmp_path / "whole"
    train(shards, whole, RunConfig(stage="1.3", steps=6, batch_size=2), from_scratch=True)
    part = tmp_path / "part"
    train(shards, part, RunConfig(stage="1.3", steps=3, batch_size=2), from_scratch=True)
    with pytest.raises(TrainingRefused, match="--resume"):
        train(shards, part, RunConfig(stage="1.3", steps=6, batch_size=2), from_scratch=True)
    with pytest.raises(TrainingRefused, match="batch_size: 2 -> 3"):  # would replay or skip data
        train(shards, part, RunConfig(stage="1.3", steps=6, batch_size=3), resume=True)
    train(shards, part, RunConfig(stage="1.3", steps=6, batch_size=2), resume=True)
    a, b = metrics(whole), metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["samples"] for r in a] == [r["samples"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
    wa, wb = weights(whole), weights(part)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_training_refuses_unvalidated_shards(demo, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo / "stage_2.2", out / "stage_2.2")  # no verdict beside it
    proc = subprocess.run([CLI, "train", "--stage", "2.2", "--shards", str(out / "stage_2.2"),
                           "--out", str(tmp_path / "run"), "--steps", "1", "--from-scratch"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    said = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert "has not been validated" in said and "vita-corpus validate" in said
    assert not (tmp_path / "run" / "latest").exists()
    # a verdict for other bytes than those on disk does not count either
    shutil.copytree(demo / "validation", out / "validation")
    tar = sorted((out / "stage_2.2").glob("*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(TrainingRefused, match="changed since it was validated"):
        train(out / "stage_2.2", tmp_path / "run", RunConfig(stage="2.2", steps=1), from_scratch=True)
    proc = subprocess.run([CLI, "train", "--stage", "2.2", "--shards", str(out / "stage_2.2"),
                           "--out", str(tmp_path / "run"), "--steps", "1", "--from-scratch",
                           "--skip-validation"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert "!!! --skip-validation" in said and "WITHOUT a validation verdict" in said
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["validated"] is False
    assert json.loads((tmp_path / "run" / "verdict.json").read_text())["skipped"] is True


def test_stage_needs_its_previous_stage(demo, tmp_path):
    with pytest.raises(TrainingRefused, match="--init RUN_1.3"):
        train(demo / "stage_2.1a", tmp_path / "r", RunConfig(stage="2.1a", steps=1))
    with pytest.raises(TrainingRefused, match="not the folder of stage 2.2"):
        train(demo / "stage_1.1", tmp_path / "r", RunConfig(stage="2.2", steps=1), from_scratch=True)


def test_a_broken_sample_or_shard_is_skipped_and_counted(demo, tmp_path):
    from storage.shards import TarShardWriter, iter_samples

    src = sorted((demo / "stage_1.2").glob("*.tar"))[0]
    samples = [(k, dict(m)) for k, m in iter_samples(str(src))]
    broken_key = samples[0][0]
    samples[0][1]["tile_00.jpg"] = b"\xff\xd8 not a jpeg"
    stage = tmp_path / "out" / "stage_1.2"
    stage.mkdir(parents=True)
    w = TarShardWriter(str(stage / "a.tar"))
    for key, members in samples:
        w.write_sample(key, list(members.items()))
    w.close()
    whole = (stage / "a.tar").read_bytes()
    (stage / "b.tar").write_bytes(whole[: len(whole) // 3])  # cut mid-member
    run = tmp_path / "run"
    summary = train(stage, run, RunConfig(stage="1.2", steps=6, batch_size=2), from_scratch=True,
                    skip_validation=True)
    assert summary["steps"] == 6
    assert summary["skipped_samples"] >= 2  # the undecodable tile and the cut shard, at least
    rows = metrics(run)
    assert rows[-1]["skipped_samples"] == summary["skipped_samples"]
    assert all(broken_key not in r["samples"] for r in rows)


def test_out_of_memory_names_what_to_lower(demo, tmp_path, monkeypatch):
    from training.model import VitaModel

    def oom(self, batch, state_weight=0.0):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(VitaModel, "forward", oom)
    with pytest.raises(TrainingRefused) as err:
        train(demo / "stage_1.2", tmp_path / "r", RunConfig(stage="1.2", steps=2, batch_size=2),
              from_scratch=True)
    msg = str(err.value)
    assert "out of GPU memory on a batch of 2 samples" in msg
    assert "--batch-size" in msg and "--max-len" in msg and "tokens (2, " in msg


def test_llm_and_tokenizer_from_a_local_qwen2_folder(demo, tmp_path):
    """A config pointing at a local Qwen2 folder: its tokenizer and weights are used, nothing
    is downloaded, and stage 1.1 leaves the (frozen) LLM exactly as loaded."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = train_tokenizer(["a local tokenizer for the test", "hello world"], 400)
    folder = tmp_path / "qwen2"
    torch.manual_seed(1)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=48,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=96,
                                       tie_word_embeddings=True))  # as Qwen2-0.5B
    llm.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    (tmp_path / "model.yaml").write_text(f"llm_path: {folder}\nllm_hidden: 48\nllm_heads: 4\n")
    run = tmp_path / "run"
    train(demo / "stage_1.1", run, RunConfig(stage="1.1", steps=2, batch_size=2),
          ModelConfig.load(tmp_path / "model.yaml"))
    config = json.loads((run / "config.json").read_text())
    assert config["origin"]["tokenizer"] == f"tokenizer from {folder}"
    assert config["llm_config"]["hidden_size"] == 48
    saved = load_file(str(folder / "model.safetensors"))
    after = weights(run)
    assert torch.equal(after["llm.model.layers.0.mlp.up_proj.weight"],
                       saved["model.layers.0.mlp.up_proj.weight"])
    assert json.loads((run / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads(tok.to_str())["model"]["vocab"]
    # the next stage starts from this run (tied embeddings survive the safetensors round trip)
    nxt = tmp_path / "run_1.2"
    train(demo / "stage_1.2", nxt, RunConfig(stage="1.2", steps=1, batch_size=2), init=run)
    assert json.loads((nxt / "config.json").read_text())["llm_config"]["tie_word_embeddings"] is True


@pytest.mark.slow
def test_two_process_ddp_under_torchrun_on_cpu(demo, tmp_path):
    """`torchrun --nproc-per-node 2 vita-corpus train ...`: two DDP ranks (gloo on a CPU), each
    reading its own part of the stage; rank 0 writes the run folder."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port), CLI, "train", "--stage", "1.2",
         "--shards", str(demo / "stage_1.2"), "--out", str(run), "--steps", "3", "--batch-size", "1",
         "--from-scratch", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    state = json.loads((ckpt.latest(run) / "state.json").read_text())
    assert set(state["position"]) == {"0", "1"}  # both ranks' readers, for an exact resume
    assert len(metrics(run)) == 3


@pytest.mark.slow
def test_training_flow_waits_for_the_verdict_then_trains(demo, tmp_path):
    """`vita-corpus train --flow --wait N` as a Prefect flow (ephemeral API): started before the
    stage is validated, it waits, and trains once a passing verdict appears."""
    import os
    import tempfile
    import time

    out = tmp_path / "out"
    shutil.copytree(demo, out, ignore=shutil.ignore_patterns("validation"))
    run = tmp_path / "run"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"), COLUMNS="200")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([CLI, "train", "--flow", "--wait", "300", "--stage", "1.2", "--shards",
                             str(out / "stage_1.2"), "--out", str(run), "--steps", "2",
                             "--from-scratch"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:  # until the flow reports that it waits
            lines.append(line)
            if "waiting for stage 1.2's verdict" in line or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "".join(lines)[-3000:]
        assert not (run / "latest").exists()
        assert validate(str(out), "1.2")["stage_1.2"]["passed"]
        rest, _ = proc.communicate(timeout=480)
    finally:
        proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    assert "waiting for stage 1.2's verdict" in log
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert json.loads((run / "verdict.json").read_text())["passed"] is True


def test_loader_workers_split_the_shards_and_resume_exactly(demo, tmp_path):
    """Two DataLoader workers read disjoint shards; a resumed run continues each worker where it
    stopped, so the steps after the resume see what an uninterrupted run saw."""
    shards = demo / "stage_1.3"
    cfg = dict(stage="1.3", batch_size=2, num_workers=2)
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(shards, whole, RunConfig(steps=6, **cfg), from_scratch=True)
    train(shards, part, RunConfig(steps=3, **cfg), from_scratch=True)
    train(shards, part, RunConfig(steps=6, **cfg), resume=True)
    a, b = metrics(whole), metrics(part)
    assert [r["samples"] for r in a] == [r["samples"] for r in b]
    state = json.loads((ckpt.latest(part) / "state.json").read_text())
    assert set(state["position"]) == {"0", "1"}
    # an epoch covers every sample once: the first steps hold no duplicates
    seen = [k for r in a[:3] for k in r["samples"]]
    assert len(seen) == len(set(seen))


def test_a_clip_encodes_the_same_alone_or_beside_a_longer_one():
    """The audio encoder's feature normalisation ignores the batch's padding."""
    from training.model import VitaModel
    from training.template import SPECIAL

    cfg = ModelConfig()
    model = VitaModel(cfg, 64, {s: i for i, s in enumerate(SPECIAL)}).eval()
    g = torch.Generator().manual_seed(0)
    short, long = torch.randn(8000, generator=g) * 0.1, torch.randn(24000, generator=g) * 0.1
    alone, frames = model.audio_features(short[None], torch.tensor([8000]))
    batch = torch.zeros(2, 24000)
    batch[0, :8000], batch[1] = short, long
    both, frames2 = model.audio_features(batch, torch.tensor([8000, 24000]))
    n = int(frames[0])
    assert int(frames2[0]) == n
    assert torch.allclose(alone[0, :n], both[0, :n], atol=1e-4)
