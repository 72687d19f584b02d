"""Frozen open_clip text tower for Stage C (and the paper's Stage B) conditioning (docs/design.md "Stage C").

Only the text tower is built (an open_clip ``TextTransformer``); the vision tower is never instantiated, so
ViT-bigG-14 costs its ~0.7B text parameters, not the full 2.5B. The module itself is randomly initialised; the
weights named by :class:`TextEncoderConfig` (an open_clip pretrained tag or a local file) are found by
:func:`lit_wuerstchen.offline.resolve_open_clip_model` and loaded by
:func:`lit_wuerstchen.checkpoints.load_text_encoder`.

The shipped ``wuerstchen-tiny-clip`` config (``lit_wuerstchen/configs/open_clip/``) is registered with open_clip
automatically; other custom architectures come in through ``model_config_file``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "open_clip"
TINY_MODEL_NAME = "wuerstchen-tiny-clip"

_REGISTERED_CONFIGS: set[Path] = set()
_TOKENIZERS: dict[tuple[str, int], object] = {}


@dataclass
class TextEncoderConfig:
    """The open_clip text tower and where its weights come from; the single source of its defaults (Würstchen v2's
    CLIP ViT-bigG-14)."""

    model_name: str = "ViT-bigG-14"
    pretrained: str | None = "laion2b_s39b_b160k"
    """open_clip pretrained tag (read from the Hugging Face cache; None with no ``weights_file``: random weights)."""
    weights_file: str | None = None
    """A local checkpoint (.safetensors/.bin/.pt): a full open_clip CLIP state dict, open_clip's custom-text layout
    (``text.*``) or this module's own ``state_dict()``; wins over ``pretrained``."""
    model_config_file: str | None = None
    """An open_clip model-config JSON for custom architectures (its file stem is the model name)."""
    final_layer_norm: bool = True
    """Token states after the final LayerNorm (Würstchen v2) or before it (Stable Cascade)."""
    context_length: int | None = None
    """Tokens per prompt (None: the model's own, 77 for CLIP); short captions can use fewer."""
    padding_mask: bool = True
    """True: padding tokens (everything after a prompt's first end-of-text token) are masked as attention keys, as
    the released Würstchen pipelines do (transformers' ``CLIPTextModel`` called with the tokenizer's
    ``attention_mask``), so the states at padding positions are the released ones. False: open_clip's causal mask
    only (``encode_text``), whose padding-position states differ. Real-token states and ``pooled`` are the same
    either way; the prior attends to every position, so its images are not."""
    exclamation_as_pad: bool = True
    """True: every "!" of a prompt becomes the padding id 0, as in the released pipelines, whose CLIP tokenizers
    have "!" as their (special) pad token and split it out of the text before BPE; False: open_clip's own
    tokenization ("!" is the word token "!</w>"). Only for open_clip's BPE tokenizer (the CLIP models)."""

    @property
    def random_init(self) -> bool:
        """No pretrained weights named: the weights must travel with whatever was trained on this encoder."""
        return self.pretrained is None and self.weights_file is None


def register_model_config(path: str | os.PathLike) -> None:
    """Register an open_clip model-config JSON (its model name is the file stem, as in open_clip)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config file not found: {path}")
    if path not in _REGISTERED_CONFIGS:
        open_clip.add_model_config(path)
        _REGISTERED_CONFIGS.add(path)


def open_clip_model_config(model_name: str, model_config_file: str | None = None) -> dict:
    """open_clip's config of ``model_name``, registering ``model_config_file`` (automatically for the shipped tiny
    model) first; an unknown model is a clear error."""
    if model_config_file is None and model_name == TINY_MODEL_NAME:
        model_config_file = str(CONFIG_DIR / f"{TINY_MODEL_NAME}.json")
    if model_config_file is not None:
        register_model_config(model_config_file)
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        hint = (
            f" (open_clip names a config after its file stem: {Path(model_config_file).stem!r})"
            if model_config_file is not None
            else ""
        )
        raise ValueError(f"Unknown open_clip model {model_name!r}{hint}. Known: {open_clip.list_models()}")
    return model_cfg


class TextEncoder(nn.Module):
    """Frozen open_clip text tower returning per-token hidden states and the pooled text embedding.

    ``forward(prompts)`` returns ``(hidden_states [B, L, width], pooled [B, embed_dim])``:

    - ``hidden_states``: the token states after the last transformer block, passed through the final LayerNorm
      when ``final_layer_norm`` (Würstchen v2, diffusers' ``last_hidden_state``) or taken before it when not
      (Stable Cascade's ``hidden_states[-1]``). With ``padding_mask`` (default) padding tokens are masked as
      attention keys, so every position, padding included, equals transformers' ``CLIPTextModel(input_ids,
      attention_mask)`` as the released pipelines call it (:mod:`lit_wuerstchen.interop.clip_text` converts both
      ways); without it, open_clip's causal mask alone gives other states at the padding positions.
    - ``pooled``: open_clip's text embedding, i.e. the final-LayerNorm'd EOT token times the text projection,
      **not** L2-normalised (as ``encode_text(normalize=False)`` and HF ``text_embeds``); always taken after the
      final LayerNorm whatever ``final_layer_norm`` says.

    Always frozen and in eval mode (``train()`` keeps it in eval), and runs under ``torch.no_grad()``. Built with
    random weights; :func:`lit_wuerstchen.checkpoints.load_text_encoder` loads the configured ones.
    """

    def __init__(self, config: TextEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or TextEncoderConfig()
        self.model_name = model_name = config.model_name
        self.final_layer_norm = config.final_layer_norm
        model_cfg = open_clip_model_config(model_name, config.model_config_file)
        text_cfg = dict(model_cfg["text_cfg"])
        if text_cfg.get("hf_model_name"):
            raise ValueError(
                f"{model_name!r} has a Hugging Face text tower; only open_clip TextTransformer towers are supported"
            )
        if config.context_length is not None:
            text_cfg["context_length"] = config.context_length

        text = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
        if not isinstance(text, TextTransformer):
            raise ValueError(f"{model_name!r} does not build an open_clip TextTransformer")
        self.text = text
        self.context_length = text.context_length
        self.padding_mask = config.padding_mask
        if self.padding_mask and text.cls_emb is not None:
            raise ValueError(
                f"{model_name!r} appends a class token (CoCa), whose mask open_clip builds itself: "
                "set the text encoder's padding_mask to false"
            )
        if self.padding_mask and text.pool_type not in ("argmax", "eos"):
            raise ValueError(
                f"{model_name!r} pools with {text.pool_type!r}, not from an end-of-text token: "
                "set the text encoder's padding_mask to false"
            )
        # the token the tower pools from ends a prompt: open_clip's argmax pooling relies on it being the highest id
        self.eot_token_id = text.eos_id if text.pool_type == "eos" else text.vocab_size - 1
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        """Frozen: always stays in eval mode."""
        return super().train(False)

    @property
    def width(self) -> int:
        return self.text.width

    @property
    def embed_dim(self) -> int:
        return self.text.output_dim if self.text.text_projection is not None else self.text.width

    def tokenize(self, prompts: list[str] | str) -> torch.Tensor:
        """Token ids ``[B, context_length]`` (int64) from open_clip's tokenizer for this model (CPU)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        key = (self.model_name, self.context_length)
        if key not in _TOKENIZERS:  # kept outside the module: deep copies / pickles of the encoder stay light
            _TOKENIZERS[key] = open_clip.get_tokenizer(self.model_name, context_length=self.context_length)
        tokenizer = _TOKENIZERS[key]
        if self.config.exclamation_as_pad and isinstance(tokenizer, SimpleTokenizer):
            return torch.stack([self._released_tokens(tokenizer, prompt) for prompt in prompts])
        return tokenizer(list(prompts)).long()

    def _released_tokens(self, tokenizer: SimpleTokenizer, prompt: str) -> torch.Tensor:
        """open_clip's BPE between the "!"s, each "!" the pad id 0, then [SOT] ... [EOT] truncated (EOT kept last)
        and padded with 0: the ids of the released pipelines' tokenizers."""
        body: list[int] = []
        for i, piece in enumerate(prompt.split("!")):
            if i:
                body.append(0)
            body.extend(tokenizer.encode(piece))
        ids = [tokenizer.sot_token_id, *body, tokenizer.eot_token_id][: self.context_length]
        ids[-1] = tokenizer.eot_token_id
        return torch.tensor(ids + [0] * (self.context_length - len(ids)), dtype=torch.long)

    def fingerprint_settings(self) -> dict:
        """What besides the weights decides the outputs (part of a precompute cache's fingerprint)."""
        return {
            "final_layer_norm": self.final_layer_norm,
            "padding_mask": self.padding_mask,
            "exclamation_as_pad": self.config.exclamation_as_pad,
        }

    def attention_mask(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive attention mask of ``padding_mask``: open_clip's causal mask plus ``-inf`` on the keys after
        each prompt's first end-of-text token (the positions transformers' ``attention_mask`` marks 0), as a
        ``[B * heads, L, L]`` mask (``nn.MultiheadAttention``'s per-head form); just the causal ``[L, L]`` mask when
        nothing is padded. A row without an end-of-text token is not masked. Every query keeps the keys up to
        itself or to the end-of-text token, so no row is all ``-inf``."""
        text = self.text
        batch, length = tokens.shape
        causal = text.attn_mask[:length, :length].to(dtype) if text.attn_mask is not None else None
        is_eot = tokens == self.eot_token_id
        last = torch.where(is_eot.any(1), is_eot.int().argmax(1), length - 1)  # last position a key may be
        padded = torch.arange(length, device=tokens.device) > last[:, None]  # [B, L]
        if not bool(padded.any()):
            return causal
        keys = torch.zeros(batch, 1, length, dtype=dtype, device=tokens.device)
        keys.masked_fill_(padded[:, None, :], float("-inf"))
        mask = keys.expand(batch, length, length) if causal is None else keys + causal
        return mask.repeat_interleave(text.heads, 0)

    @torch.no_grad()
    def forward(self, prompts: list[str] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        text = self.text
        tokens = tokens.to(text.token_embedding.weight.device).long()
        x, attn_mask = text._embeds(tokens)  # token + positional embedding, causal (and pad/cls) mask
        if self.padding_mask:
            attn_mask = self.attention_mask(tokens, x.dtype)
        x = text.transformer(x, attn_mask=attn_mask)
        if text.cls_emb is not None:  # CoCa-style appended class token: pooled from it, LN after pooling
            hidden = x[:, :-1]
            pooled = text.ln_final(text_global_pool(x, pool_type="last"))
            normed = text.ln_final(hidden) if self.final_layer_norm else hidden
        else:
            hidden = x
            normed = text.ln_final(x)
            pooled = text_global_pool(normed, tokens, pool_type=text.pool_type, eos_token_id=text.eos_id)
        if text.text_projection is not None:
            if isinstance(text.text_projection, nn.Linear):
                pooled = text.text_projection(pooled)
            else:
                pooled = pooled @ text.text_projection
        hidden_states = normed if self.final_layer_norm else hidden
        return hidden_states, pooled
