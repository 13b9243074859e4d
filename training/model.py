"""The VITA-architecture model: one module per name the stage recipes use.

Children are named exactly as schemas.recipes.MODULES (vision_encoder, vision_adapter, llm,
audio_encoder, ctc_head, audio_adapter, task_tokens, state_head, codec, nar_decoder,
ar_decoder), so a stage plan freezes and trains by name. The chat-control tokens
(`<|im_start|>`, `<|im_end|>`, ...) read their embeddings from `task_tokens`, not from the LLM's
table, which is how stage 2.1b trains them while the LLM stays frozen.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2ForCausalLM

from training.config import ModelConfig
from training.modules import (
    AudioAdapter,
    AudioEncoder,
    Codec,
    TowerEncoder,
    VisionAdapter,
    VisionEncoder,
)
from training.template import AUDIO, IGNORE, IMAGE, SPECIAL


# The AR decoder's vocabulary: the codec's codes, then begin and end of speech.
def speech_bos(cfg: ModelConfig) -> int:
    return cfg.codec_codebook


def speech_eos(cfg: ModelConfig) -> int:
    return cfg.codec_codebook + 1


def _llama(cfg: ModelConfig, layers: int, vocab: int) -> LlamaModel:
    c = LlamaConfig(vocab_size=vocab, hidden_size=cfg.decoder_hidden, num_hidden_layers=layers,
                    num_attention_heads=cfg.decoder_heads, num_key_value_heads=cfg.decoder_heads,
                    intermediate_size=4 * cfg.decoder_hidden, max_position_embeddings=8192)
    return LlamaModel(c)


class SpeechDecoder(nn.Module):
    """NAR (whole text at once) or AR (next speech token) decoder of LLaMA layers."""

    def __init__(self, cfg: ModelConfig, layers: int, in_dim: int, vocab: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, cfg.decoder_hidden)
        self.layers = _llama(cfg, layers, vocab)
        self.head = nn.Linear(cfg.decoder_hidden, vocab)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # positions count real tokens only, so a sample's speech positions do not depend on how
        # much padding its batch put after its text
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        return self.layers(inputs_embeds=self.proj(x), attention_mask=mask, position_ids=pos,
                           use_cache=False).last_hidden_state


class VitaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int],
                 llm: Qwen2ForCausalLM | None = None, tower: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.special_ids = dict(special_ids)
        # Under FSDP every rank must run the same blocks and give gradients to the same
        # parameters each step (the collectives are per block): a batch without images or audio
        # still runs those encoders on a blank input whose output counts zero in the loss.
        self.uniform_paths = False
        self.vision_encoder = VisionEncoder(cfg) if tower is None else TowerEncoder(cfg, tower)
        self.vision_adapter = VisionAdapter(self.vision_encoder.out_dim, cfg.llm_hidden)
        if llm is None:
            llm = Qwen2ForCausalLM(Qwen2Config(
                vocab_size=vocab_size, hidden_size=cfg.llm_hidden, num_hidden_layers=cfg.llm_layers,
                num_attention_heads=cfg.llm_heads, num_key_value_heads=cfg.llm_kv_heads,
                intermediate_size=cfg.llm_intermediate, max_position_embeddings=cfg.llm_max_positions,
                tie_word_embeddings=False))
        self.llm = llm
        self.audio_encoder = AudioEncoder(cfg)
        self.ctc_head = nn.Linear(cfg.audio_hidden, vocab_size)
        self.audio_adapter = AudioAdapter(cfg)
        self.task_tokens = nn.Embedding(len(SPECIAL), cfg.llm_hidden)
        with torch.no_grad():
            table = self.llm.get_input_embeddings().weight
            self.task_tokens.weight.copy_(table[[special_ids[s] for s in SPECIAL]])
        self.state_head = nn.Linear(cfg.llm_hidden, 2)  # 0: typed question, 1: spoken
        self.codec = Codec(cfg)
        self.nar_decoder = SpeechDecoder(cfg, cfg.nar_layers, cfg.llm_hidden, cfg.codec_codebook)
        self.ar_decoder = SpeechDecoder(cfg, cfg.ar_layers, cfg.decoder_hidden, cfg.codec_codebook + 2)
        special = torch.full((vocab_size,), -1, dtype=torch.long)
        for k, s in enumerate(SPECIAL):
            special[special_ids[s]] = k
        self.register_buffer("special_index", special, persistent=False)

    # --- embeddings -------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.llm.get_input_embeddings()(ids)
        k = self.special_index[ids]
        is_special = k >= 0
        if is_special.any():
            x = torch.where(is_special[..., None], self.task_tokens(k.clamp(min=0)).to(x.dtype), x)
        return x

    def audio_features(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs (25 Hz) and their valid lengths for right-padded 16 kHz clips."""
        from training.template import encoder_frames, fbank_frames

        frames = torch.tensor([encoder_frames(int(n)) for n in lengths], device=wav.device)
        fb = torch.tensor([fbank_frames(int(n)) for n in lengths], device=wav.device)
        return self.audio_encoder(wav, frames, fb), frames

    def _fill(self, x: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        n = int(mask.sum())
        if n == 0:
            return x
        if feats.shape[0] != n:
            raise ValueError(f"{n} placeholder tokens but {feats.shape[0]} features: the "
                             "template and the media disagree")
        return x.masked_scatter(mask[..., None], feats.to(x.dtype))

    # --- losses per kind of stage -----------------------------------------------------------
    def lm_loss(self, batch: dict[str, Any], state_weight: float = 0.0,
                per_sample: bool = False) -> dict[str, torch.Tensor]:
        """The answer tokens' mean cross-entropy. A packed batch (several samples per row) has
        `position_ids` restarting at each sample; the LLM then gets no 2D mask and builds a
        block-diagonal causal one from them, so no sample sees another. per_sample adds each
        sample's own mean loss (`per_sample`, in the order of batch["spans"])."""
        ids = batch["input_ids"]
        x = self.embed(ids)
        zero = x.new_zeros(())  # blank-input outputs join the loss through this, times zero
        if batch["tiles"].shape[0]:
            v = self.vision_adapter(self.vision_encoder(batch["tiles"]))
            x = self._fill(x, ids == self.special_ids[IMAGE], v.reshape(-1, v.shape[-1]))
        elif self.uniform_paths:
            size = self.cfg.image_size
            blank = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=ids.device)
            zero = zero + 0 * self.vision_adapter(self.vision_encoder(blank)).sum()
        if batch["audio"].shape[0]:
            enc, frames = self.audio_features(batch["audio"], batch["audio_lengths"])
            a = self.audio_adapter(enc)
            valid = torch.arange(a.shape[1], device=a.device)[None] < ((frames + 1) // 2)[:, None]
            x = self._fill(x, ids == self.special_ids[AUDIO], a[valid])
        elif self.uniform_paths:
            silence = torch.zeros(1, 1600, device=ids.device)
            enc, _ = self.audio_features(silence, torch.tensor([1600], device=ids.device))
            zero = zero + 0 * self.audio_adapter(enc).sum()
        pos = batch.get("position_ids")
        mask = None if pos is not None else batch["attention_mask"]
        out = self.llm.model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
        h = out.last_hidden_state
        logits = self.llm.lm_head(h[:, :-1])
        labels = batch["labels"][:, 1:]
        tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=IGNORE, reduction="none").view(labels.shape)
        # a mean over the batch's answer tokens, 0 (not NaN) when a batch has none
        lm = tok.sum() / (labels != IGNORE).sum().clamp(min=1)
        res = {"loss": lm + zero.float(), "lm": lm}
        if per_sample:
            # a sample in [start, end) of its row is predicted from positions start .. end-2
            res["per_sample"] = torch.stack([
                tok[r, s:e - 1].sum() / (labels[r, s:e - 1] != IGNORE).sum().clamp(min=1)
                for r, s, e in batch["spans"].tolist()])
        if state_weight and batch["state_index"].shape[0]:
            b, p = batch["state_index"].unbind(1)
            state_logits = self.state_head(h[b, p]).float()
            st = F.cross_entropy(state_logits, batch["state_labels"])
            res["state"] = st
            res["state_acc"] = (state_logits.argmax(-1) == batch["state_labels"]).float().mean()
            res["loss"] = res["loss"] + state_weight * st
        elif state_weight and self.uniform_paths:
            res["loss"] = res["loss"] + 0 * self.state_head(h[:1, 0]).float().sum()
        return res

    def ctc_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        enc, frames = self.audio_features(batch["audio"], batch["audio_lengths"])
        logp = F.log_softmax(self.ctc_head(enc).float(), -1).transpose(0, 1)
        loss = F.ctc_loss(logp, batch["targets"], frames, batch["target_lengths"],
                          blank=self.special_ids["<pad>"], zero_infinity=True)
        return {"loss": loss, "ctc": loss}

    def codec_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.codec(batch["speech"])
        out.pop("codes")
        return out

    def speech_decoder_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Text -> (frozen LLM) -> NAR decoder -> AR decoder predicting the frozen codec's codes."""
        cfg = self.cfg
        with torch.no_grad():
            text = self.llm.model(inputs_embeds=self.embed(batch["input_ids"]),
                                  attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
            _, codes = self.codec.encode(batch["speech"])
        nar = self.nar_decoder(text, batch["attention_mask"])
        b, t = codes.shape
        pos = torch.arange(t + 1, device=codes.device)[None]
        lengths = batch["code_lengths"][:, None]
        eos = torch.full((b, 1), speech_eos(cfg), device=codes.device)
        target = torch.where(pos < lengths, torch.cat([codes, eos], 1), speech_eos(cfg))
        bos = torch.full((b, 1), speech_bos(cfg), device=codes.device)
        tokens = torch.cat([bos, target[:, :-1]], 1)
        ar_in = torch.cat([nar, self.ar_decoder.layers.embed_tokens(tokens)], 1)
        ar_mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1)
        h = self.ar_decoder(ar_in, ar_mask)[:, nar.shape[1]:]
        labels = torch.where(pos <= lengths, target, IGNORE)  # the codes, then one end token
        ar = F.cross_entropy(self.ar_decoder.head(h).float().reshape(-1, cfg.codec_codebook + 2),
                             labels.reshape(-1), ignore_index=IGNORE)
        valid = pos[:, :t] < lengths
        # The NAR decoder also predicts which codes the utterance uses (a bag of codes), so it
        # learns the utterance's content from the text as a whole.
        m = batch["attention_mask"][..., None].to(nar.dtype)
        pooled = (nar * m).sum(1) / m.sum(1)
        bag = torch.zeros(b, cfg.codec_codebook, device=codes.device)
        bag.scatter_add_(1, codes, valid.float())
        bag = bag / bag.sum(1, keepdim=True).clamp(min=1)
        nar_loss = -(bag * F.log_softmax(self.nar_decoder.head(pooled).float(), -1)).sum(1).mean()
        return {"loss": ar + nar_loss, "ar": ar, "nar": nar_loss}

    def forward(self, batch: dict[str, Any], state_weight: float = 0.0) -> dict[str, torch.Tensor]:
        kind = batch["kind"]
        if kind == "lm":
            return self.lm_loss(batch, state_weight)
        if kind == "ctc":
            return self.ctc_loss(batch)
        if kind == "codec":
            return self.codec_loss(batch)
        if kind == "tts":
            return self.speech_decoder_loss(batch)
        raise ValueError(f"unknown batch kind {kind!r}")
