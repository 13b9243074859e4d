"""Stages trained from pretrained parts in local folders: tiny random SigLIP, CLIP and
InternViT-style (own code) vision towers and a Qwen2 LLM, saved with save_pretrained; and the
mismatches that are refused."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.build.pipeline import build
from flows.corpora.demo import make_demo_inputs
from flows.validation.gate import validate
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES
from training import checkpoint as ckpt
from training.config import ModelConfig, RunConfig, TrainConfigError
from training.loop import build_start, train
from training.stages import plan_for
from training.template import train_tokenizer

TILE = 448  # the demo shards' tile size


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrained")
    cfg = load_config(make_demo_inputs(root / "inputs"))
    build(cfg, str(root / "out"), stages=[r for r in DEFAULT_RECIPES if r.stage in ("1.1", "1.2")])
    assert all(v["passed"] for v in validate(str(root / "out")).values())
    return root / "out"


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("qwen2")
    tok = train_tokenizer(["a local tokenizer for the test", "describe the picture"], 400)
    torch.manual_seed(1)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                 tie_word_embeddings=True)).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    return folder


def _vision(**kw) -> dict:
    return dict(image_size=TILE, patch_size=56, hidden_size=24, intermediate_size=48,
                num_hidden_layers=1, num_attention_heads=2) | kw


def siglip_folder(folder: Path, **kw) -> Path:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(2)
    SiglipVisionModel(SiglipVisionConfig(**_vision(**kw))).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 448}}))
    return folder


def model_yaml(path: Path, qwen2: Path, vision: Path, extra: str = "") -> Path:
    path.write_text(f"llm_path: {qwen2}\nllm_hidden: 48\nllm_heads: 4\nvision_path: {vision}\n{extra}")
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest(run) / "model.safetensors"))


def tower_weights(run: Path) -> dict[str, torch.Tensor]:
    prefix = "vision_encoder.tower."
    return {k[len(prefix):]: v for k, v in weights(run).items() if k.startswith(prefix)}


def test_stage_1_1_then_1_2_from_saved_siglip_and_qwen2_folders(demo, qwen2, tmp_path):
    tower = siglip_folder(tmp_path / "siglip")
    cfg = ModelConfig.load(model_yaml(tmp_path / "model.yaml", qwen2, tower))
    # the folder decides the tower's shapes and normalisation
    assert (cfg.vision_hidden, cfg.patch_size, cfg.vision_image_size) == (24, 56, 448)
    assert cfg.image_mean == [0.5, 0.5, 0.5] and cfg.tokens_per_tile == 16
    run = tmp_path / "run_1.1"
    train(demo / "stage_1.1", run, RunConfig(stage="1.1", steps=3, batch_size=2), cfg)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["vision_path"] == str(tower) and config["model"]["vision_hidden"] == 24
    assert config["origin"]["vision_tower"] == str(tower)
    assert sorted(p.name for p in (run / "vision_tower").iterdir()) == [
        "config.json", "preprocessor_config.json"]  # the architecture, not the weights
    saved = load_file(str(tower / "model.safetensors"))
    after = tower_weights(run)
    assert after and all(torch.equal(after[k], saved[k]) for k in after)  # loaded, and frozen in 1.1
    assert not any(k.startswith("head.") for k in after)  # SigLIP's pooling head is left out
    w = weights(run)
    assert w["vision_adapter.net.1.weight"].shape == (48, 4 * 24)  # pixel shuffle of width 24 -> LLM 48
    llm_saved = load_file(str(qwen2 / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(w[f"llm.{key}"], llm_saved[key])
    # stage 1.2 rebuilds the tower from the run folder's copy of its config and trains it
    nxt = tmp_path / "run_1.2"
    train(demo / "stage_1.2", nxt, RunConfig(stage="1.2", steps=2, batch_size=2), init=run)
    assert (nxt / "vision_tower" / "config.json").is_file()
    trained = tower_weights(nxt)
    assert set(trained) == set(after)
    assert any(not torch.equal(trained[k], after[k]) for k in after)


def test_a_whole_clip_folder_gives_its_vision_half(demo, qwen2, tmp_path):
    """A CLIPModel folder (vision and text, no preprocessor config): the vision half loads, with
    OpenAI CLIP's normalisation, and its CLS token is dropped before the pixel shuffle."""
    from transformers import CLIPConfig, CLIPModel

    from training.towers import OPENAI_CLIP_MEAN

    torch.manual_seed(3)
    clip = CLIPModel(CLIPConfig(vision_config=_vision(), text_config=dict(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    clip.save_pretrained(tmp_path / "clip")
    cfg = ModelConfig.load(model_yaml(tmp_path / "model.yaml", qwen2, tmp_path / "clip"))
    assert cfg.image_mean == pytest.approx(list(OPENAI_CLIP_MEAN)) and cfg.tokens_per_tile == 16
    run = tmp_path / "run"
    summary = train(demo / "stage_1.1", run, RunConfig(stage="1.1", steps=2, batch_size=2), cfg)
    assert summary["steps"] == 2 and summary["final"]["loss"] > 0
    vision = {k[len("vision_model."):]: v for k, v in clip.state_dict().items()
              if k.startswith("vision_model.")}
    after = tower_weights(run)
    assert set(after) <= set(vision) and len(after) > 10
    assert all(torch.equal(after[k], vision[k]) for k in after)
    assert not any("text_model" in k for k in weights(run))


CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyInternVisionConfig(PretrainedConfig):
    model_type = "tiny_intern_vit"

    def __init__(self, image_size=448, patch_size=56, hidden_size=24, num_hidden_layers=1,
                 num_attention_heads=2, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.patch_size, self.hidden_size = image_size, patch_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
'''

MODELING_PY = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_tiny_intern import TinyInternVisionConfig


class TinyInternLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.hidden_size), nn.LayerNorm(c.hidden_size)
        self.attn = nn.MultiheadAttention(c.hidden_size, c.num_attention_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(c.hidden_size, 2 * c.hidden_size), nn.GELU(),
                                 nn.Linear(2 * c.hidden_size, c.hidden_size))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyInternEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(TinyInternLayer(c) for _ in range(c.num_hidden_layers))


class TinyInternVisionModel(PreTrainedModel):
    config_class = TinyInternVisionConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        g = config.image_size // config.patch_size
        self.patch = nn.Conv2d(3, config.hidden_size, config.patch_size, config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos = nn.Parameter(torch.randn(1, g * g + 1, config.hidden_size) * 0.02)
        self.encoder = TinyInternEncoder(config)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for layer in self.encoder.layers:
            x = layer(x)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x[:, 0])
'''


def test_an_internvit_style_folder_with_its_own_code(demo, qwen2, tmp_path, monkeypatch):
    """A folder whose config maps AutoModel to its own modeling file (as InternViT-300M's does)
    loads with trust_remote_code; the run folder keeps the code so stage 1.2 rebuilds it."""
    import transformers.dynamic_module_utils as dmu
    from transformers import AutoConfig, AutoModel

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not in $HOME
    folder = tmp_path / "intern_vit"
    folder.mkdir()
    (folder / "configuration_tiny_intern.py").write_text(CONFIG_PY)
    (folder / "modeling_tiny_intern.py").write_text(MODELING_PY)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tiny_intern_vit", "image_size": TILE, "patch_size": 56, "hidden_size": 24,
        "num_hidden_layers": 1, "num_attention_heads": 2,
        "auto_map": {"AutoConfig": "configuration_tiny_intern.TinyInternVisionConfig",
                     "AutoModel": "modeling_tiny_intern.TinyInternVisionModel"}}))
    torch.manual_seed(4)
    AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True),
                          trust_remote_code=True).save_pretrained(folder)
    cfg = ModelConfig.load(model_yaml(tmp_path / "model.yaml", qwen2, folder))
    assert cfg.image_mean == [0.485, 0.456, 0.406]  # no preprocessor config: InternViT's default
    run = tmp_path / "run_1.1"
    train(demo / "stage_1.1", run, RunConfig(stage="1.1", steps=2, batch_size=2), cfg)
    assert {"modeling_tiny_intern.py", "configuration_tiny_intern.py"} <= {
        p.name for p in (run / "vision_tower").iterdir()}
    saved = load_file(str(folder / "model.safetensors"))
    after = tower_weights(run)
    assert set(after) == set(saved) and all(torch.equal(after[k], saved[k]) for k in saved)
    nxt = tmp_path / "run_1.2"
    train(demo / "stage_1.2", nxt, RunConfig(stage="1.2", steps=1, batch_size=2), init=run)
    assert any(not torch.equal(tower_weights(nxt)[k], saved[k]) for k in saved)


def test_mismatched_parts_are_refused_naming_both_values(demo, qwen2, tmp_path):
    small = siglip_folder(tmp_path / "siglip224", image_size=224)
    with pytest.raises(TrainConfigError) as err:
        ModelConfig.load(model_yaml(tmp_path / "a.yaml", qwen2, small))
    msg = str(err.value)
    assert "takes 224 px images but the tiles are 448 px" in msg and "vision_resize: true" in msg
    # the same folder through the Python API, refused when the stage starts
    with pytest.raises(TrainConfigError, match="224 px"):
        train(demo / "stage_1.1", tmp_path / "r0", RunConfig(stage="1.1", steps=1, batch_size=2),
              ModelConfig(vision_path=str(small), llm_path=str(qwen2), llm_hidden=48, llm_heads=4))
    # handled when asked: tiles resized to the tower's 224 px, 4 tokens per tile at patch 56
    cfg = ModelConfig.load(model_yaml(tmp_path / "b.yaml", qwen2, small, "vision_resize: true\n"))
    assert cfg.vision_image_size == 224 and cfg.image_size == TILE and cfg.tokens_per_tile == 4
    summary = train(demo / "stage_1.1", tmp_path / "r1", RunConfig(stage="1.1", steps=1, batch_size=2), cfg)
    assert summary["steps"] == 1
    # a model config that contradicts the folder's width
    tower = siglip_folder(tmp_path / "siglip")
    with pytest.raises(TrainConfigError, match=r"vision_hidden 64 \(the folder says 24\)"):
        ModelConfig.load(model_yaml(tmp_path / "c.yaml", qwen2, tower, "vision_hidden: 64\n"))
    # a patch grid the 2x2 pixel shuffle cannot fold (416 / 32 = 13)
    odd = siglip_folder(tmp_path / "odd", image_size=416, patch_size=32)
    with pytest.raises(TrainConfigError, match="13x13 patch grid"):
        ModelConfig.load(model_yaml(tmp_path / "d.yaml", qwen2, odd, "vision_resize: true\n"))
    # the LLM's width against the config's
    bad_llm = tmp_path / "e.yaml"
    bad_llm.write_text(f"llm_path: {qwen2}\nllm_hidden: 64\nllm_heads: 4\nvision_path: {tower}\n")
    with pytest.raises(TrainConfigError, match="llm_hidden 64 differs from the hidden size 48"):
        build_start(tmp_path / "r2", plan_for("1.1"), [], ModelConfig.load(bad_llm), None)
    # a folder that is no vision tower
    with pytest.raises(TrainConfigError, match="holds a 'qwen2' model"):
        ModelConfig.load(model_yaml(tmp_path / "f.yaml", qwen2, qwen2))
