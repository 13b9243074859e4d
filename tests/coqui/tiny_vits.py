"""A tiny, randomly initialised coqui VITS: two speakers, English and Chinese, saved to a folder
the way a trained checkpoint is (`model.pth` + `config.json`), so the project's backend loads
it through `TTS(model_path=..., config_path=...)` exactly as it would a real model.

Random weights do not speak words; what the tests need is the real loading and inference path.
The duration predictor is what sets the pace of a random model: `length_scale` stretches it to
roughly the pace of speech, so the audio falls in the gate's bounds the way speech does.
"""

from __future__ import annotations

import math
from pathlib import Path

SPEAKERS = ["anna", "bo"]
LANGUAGES = ["en", "zh-cn"]
# Graphemes: English letters plus the Chinese characters the tests speak (test_speech.ZH_Q,
# ZH_WORDS); a trained Chinese VITS's vocabulary is its training set's characters.
ZH_CHARS = "的首都是哪里有几条腿请描述颜色法国蜘蛛天空河流今气很好你吗"


def make_tiny_vits(folder: Path, seed: int = 0, length_scale: float = 4.5,
                   level_dbfs: float = -20.0) -> tuple[Path, Path]:
    """Write `folder/model.pth` and `folder/config.json`; return their paths."""
    import torch
    from TTS.tts.configs.shared_configs import CharactersConfig
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits, VitsArgs

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    args = VitsArgs(
        hidden_channels=16, hidden_channels_ffn_text_encoder=32, num_heads_text_encoder=2,
        num_layers_text_encoder=1, num_layers_posterior_encoder=1, num_layers_flow=1,
        resblock_kernel_sizes_decoder=[3], resblock_dilation_sizes_decoder=[[1, 3, 5]],
        upsample_initial_channel_decoder=16, upsample_rates_decoder=[8, 8, 2, 2],
        upsample_kernel_sizes_decoder=[16, 16, 4, 4], init_discriminator=False,
        use_speaker_embedding=True, speaker_embedding_channels=8,
        use_language_embedding=True, embedded_language_dim=4, length_scale=length_scale,
        use_sdp=False)
    chars = CharactersConfig(
        characters_class="TTS.tts.models.vits.VitsCharacters", pad="<PAD>", eos="", bos="",
        blank="<BLNK>", characters="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" + ZH_CHARS,
        punctuations="!'(),-.:;? ？。，", phonemes="", is_unique=True, is_sorted=True)
    cfg = VitsConfig(model_args=args, use_phonemes=False, text_cleaner="multilingual_cleaners",
                     characters=chars, speakers=list(SPEAKERS), languages=list(LANGUAGES),
                     add_blank=True)
    model = Vits(cfg)
    model.eval()
    # Random vocoder weights come out anywhere from near silence to a saturated tanh, which the
    # gate (rightly) refuses: scale the last layer until a probe sentence sits at `level_dbfs`.
    post = model.waveform_decoder.conv_post
    param = post.parametrizations.weight.original0 if hasattr(post, "parametrizations") else post.weight
    ids = torch.LongTensor(model.tokenizer.text_to_ids("a probe of the level")).unsqueeze(0)
    aux = {"speaker_ids": torch.LongTensor([0]), "language_ids": torch.LongTensor([0])}
    target = 10 ** (level_dbfs / 20)
    with torch.no_grad():
        for _ in range(8):
            torch.manual_seed(seed)
            rms = model.inference(ids, aux_input=aux)["model_outputs"].pow(2).mean().sqrt().item()
            if abs(math.log10(rms / target)) < 0.05:  # within 1 dB
                break
            param.mul_(target / rms)
    cfg.model_args.num_chars = model.args.num_chars
    cfg.num_speakers = len(SPEAKERS)
    config_path, model_path = folder / "config.json", folder / "model.pth"
    cfg.save_json(str(config_path))
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, model_path)
    return model_path, config_path
