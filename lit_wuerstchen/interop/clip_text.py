"""Two-way bridge between this framework's open_clip text tower
(:class:`~lit_wuerstchen.models.text_encoder.TextEncoder`) and transformers' CLIP text models, which the released
Würstchen pipelines (diffusers) use.

The released pipelines encode a prompt as ``tokenizer(prompt, padding="max_length", max_length=77,
truncation=True)`` and ``text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state``. A
``TextEncoder`` with ``padding_mask=True`` (the default) gives those states at every position, padding included
(transformers masks padding keys; open_clip's ``encode_text`` does not), and its pooled output is
``CLIPTextModelWithProjection``'s ``text_embeds``.

- :func:`transformers_config`, :func:`to_transformers_state_dict`, :func:`to_transformers`: open_clip -> transformers
  (``CLIPTextModelWithProjection`` or ``CLIPTextModel``) and a ``CLIPTokenizer`` built offline from open_clip's own
  BPE vocabulary (:func:`save_tokenizer` writes it as a folder, e.g. a diffusers pipeline's ``tokenizer/``).
- :func:`from_transformers_state_dict`, :func:`from_transformers`: transformers -> open_clip.

The key map is exact both ways (every key mapped, none left over; a missing or extra key is a one-line
``ValueError`` naming it): ``token_embedding`` / ``positional_embedding`` -> ``embeddings.*``; per layer
``attn.in_proj_*`` split into ``q/k/v_proj``, ``attn.out_proj``, ``ln_1/ln_2`` -> ``layer_norm1/2``,
``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``; ``ln_final`` -> ``final_layer_norm``; open_clip's ``text_projection``
parameter ``P`` (``[width, embed]``, used as ``x @ P``) -> the bias-free ``text_projection`` Linear, weight ``P.T``.

transformers is optional (``pip install 'lit_wuerstchen[interop]'``) and imported only inside these functions.
One difference is left, in the tokenizers rather than the models: open_clip cleans a prompt with ftfy and
``html.unescape`` before BPE, transformers' ``CLIPTokenizer`` (v5, ``tokenizers``-backed) does not, so prompts with
HTML entities (``&amp;``) or mojibake tokenize differently; plain text, punctuation and capitals agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIPTextCfg
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from ..files import write_text_atomic
from ..models.text_encoder import TINY_MODEL_NAME, TextEncoder, TextEncoderConfig, open_clip_model_config

INSTALL_HINT = "pip install 'lit_wuerstchen[interop]'"

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|startoftext|>", "<|endoftext|>", "!"
"""transformers' names of open_clip's ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407); the LAION
tokenizers pad with "!" (id 0), as open_clip does."""
BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = 49406, 49407, 0

_OPEN_CLIP_SPECIAL = {"<start_of_text>": BOS_TOKEN, "<end_of_text>": EOS_TOKEN}
_HF_PREFIX = "text_model."
_HF_PROJECTION = "text_projection.weight"
_IGNORED_HF_KEYS = ("embeddings.position_ids",)  # a buffer older transformers versions saved; not a weight
_LAYER_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_TOP_RENAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
KNOWN_MODELS = (
    TINY_MODEL_NAME,
    "ViT-bigG-14",
    "ViT-H-14",
    "ViT-L-14",
    "ViT-bigG-14-quickgelu",
    "ViT-H-14-quickgelu",
    "ViT-L-14-quickgelu",
)
"""open_clip model names :func:`from_transformers` recognises, in order of preference (Würstchen v2's prior and
decoder towers first)."""
_PLACEHOLDER_VISION_CFG = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
_COMPARED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
)


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"transformers is needed to convert CLIP text encoders: {INSTALL_HINT}") from error
    return transformers


# --- open_clip -> transformers ------------------------------------------------------------------------------------
def _check_convertible(encoder: TextEncoder) -> None:
    """Refuse, in one line, an open_clip tower transformers' CLIP text model cannot express."""
    text, name = encoder.text, encoder.model_name

    def refuse(why: str) -> None:
        raise ValueError(f"{name!r} cannot be converted to transformers' CLIP text model: {why}")

    if text.cls_emb is not None:
        refuse("it appends a class token (CoCa)")
    if text.attn_mask is None:
        refuse("it is not causal (no_causal_mask)")
    if text.pool_type not in ("argmax", "eos"):
        refuse(f"it pools with {text.pool_type!r}, not from the end-of-text token")
    if isinstance(text.text_projection, nn.Linear) and text.text_projection.bias is not None:
        refuse("its text projection has a bias")
    eps = {module.eps for module in text.modules() if isinstance(module, nn.LayerNorm)}
    if len(eps) != 1:
        refuse(f"its LayerNorms use several eps {sorted(eps)}")
    for block in text.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock:
            refuse(f"it uses {type(block).__name__} blocks (custom attention)")
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            refuse("it uses LayerScale")
        if hasattr(block, "ln_1_kv"):
            refuse("it has cross-attention blocks")
        if block.attn.in_proj_weight is None or block.attn.in_proj_bias is None:
            refuse("its attention has separate or bias-free q/k/v projections")
        act = block.mlp.gelu
        if not isinstance(act, QuickGELU) and not (isinstance(act, nn.GELU) and act.approximate == "none"):
            refuse(f"its MLP activation is {act!r}")


def _hidden_act(encoder: TextEncoder) -> str:
    return "quick_gelu" if isinstance(encoder.text.transformer.resblocks[0].mlp.gelu, QuickGELU) else "gelu"


def transformers_config(encoder: TextEncoder):
    """The ``transformers.CLIPTextConfig`` of ``encoder``'s open_clip tower (token ids of open_clip's tokenizer:
    bos 49406, eos = the end-of-text token the tower pools from, 49407 for CLIP, pad 0)."""
    transformers = _transformers()
    _check_convertible(encoder)
    text = encoder.text
    blocks = text.transformer.resblocks
    return transformers.CLIPTextConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=text.heads,
        max_position_embeddings=text.num_pos,
        hidden_act=_hidden_act(encoder),
        layer_norm_eps=text.ln_final.eps,
        projection_dim=encoder.embed_dim,
        attention_dropout=0.0,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=encoder.eot_token_id,
        pad_token_id=PAD_TOKEN_ID,
    )


def _hf_name(key: str) -> str | None:
    """transformers' name (without ``text_model.``) of an open_clip tower key that maps one-to-one, else None."""
    if key in _TOP_RENAMES:
        return _TOP_RENAMES[key]
    parts = key.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["transformer", "resblocks"] and parts[3] in _LAYER_RENAMES:
        return f"encoder.layers.{parts[2]}.{_LAYER_RENAMES[parts[3]]}"
    return None


def _in_proj_names(key: str) -> list[str] | None:
    """transformers' q/k/v names of an open_clip ``in_proj`` key, else None."""
    parts = key.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["transformer", "resblocks"] and parts[3] in _IN_PROJ:
        return [f"encoder.layers.{parts[2]}.self_attn.{p}_proj.{_IN_PROJ[parts[3]]}" for p in "qkv"]
    return None


def to_transformers_state_dict(encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """``encoder``'s weights in ``CLIPTextModelWithProjection``'s layout (``text_model.*`` and, when the tower has
    a projection, ``text_projection.weight``); every open_clip key is mapped (an unknown one is a ValueError)."""
    _check_convertible(encoder)
    state: dict[str, torch.Tensor] = {}
    for key, value in encoder.text.state_dict().items():
        value = value.detach()
        if (name := _hf_name(key)) is not None:
            state[_HF_PREFIX + name] = value.clone()
        elif (names := _in_proj_names(key)) is not None:
            for name, part in zip(names, value.chunk(3, dim=0)):
                state[_HF_PREFIX + name] = part.clone()
        elif key == "text_projection":  # a [width, embed] parameter used as x @ P
            state[_HF_PROJECTION] = value.t().contiguous()
        elif key == "text_projection.weight":  # a bias-free nn.Linear
            state[_HF_PROJECTION] = value.clone()
        else:
            raise ValueError(f"open_clip text-tower key {key!r} has no transformers CLIP counterpart")
    return state


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """open_clip's BPE vocabulary (special tokens under transformers' names) and its merges in rank order."""
    bpe = open_clip.tokenizer.SimpleTokenizer()
    vocab = {_OPEN_CLIP_SPECIAL.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    if vocab.get(BOS_TOKEN) != BOS_TOKEN_ID or vocab.get(EOS_TOKEN) != EOS_TOKEN_ID or vocab[PAD_TOKEN] != PAD_TOKEN_ID:
        raise ValueError("open_clip's BPE vocabulary does not have CLIP's special token ids")
    return vocab, merges


def save_tokenizer(directory: str | os.PathLike, context_length: int = 77) -> Path:
    """Write open_clip's tokenizer as a folder ``transformers.CLIPTokenizer.from_pretrained`` loads (``vocab.json``,
    ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``): the LAION tokenizers' settings, padding
    with "!" to ``context_length`` tokens. Returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": int(context_length),
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return directory


def clip_tokenizer(context_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with open_clip's vocabulary, built offline (see :func:`save_tokenizer`)."""
    transformers = _transformers()
    with tempfile.TemporaryDirectory() as directory:
        return transformers.CLIPTokenizer.from_pretrained(save_tokenizer(directory, context_length))


def to_transformers(encoder: TextEncoder, with_projection: bool = True):
    """``(model, tokenizer)``: a ``CLIPTextModelWithProjection`` (``with_projection``) or ``CLIPTextModel`` holding
    ``encoder``'s weights (loaded strictly), in eval mode on ``encoder``'s device and dtype, and the matching
    ``CLIPTokenizer`` (open_clip's vocabulary, ``model_max_length`` = the encoder's context length)."""
    transformers = _transformers()
    config = transformers_config(encoder)
    state = to_transformers_state_dict(encoder)
    if with_projection:
        if _HF_PROJECTION not in state:
            raise ValueError(f"{encoder.model_name!r} has no text projection: use with_projection=False")
        model = transformers.CLIPTextModelWithProjection(config)
    else:
        state.pop(_HF_PROJECTION, None)
        model = transformers.CLIPTextModel(config)
        if not any(key.startswith(_HF_PREFIX) for key in model.state_dict()):  # transformers 5: no text_model.
            state = {key.removeprefix(_HF_PREFIX): value for key, value in state.items()}
    model.load_state_dict(state, strict=True)
    weight = encoder.text.token_embedding.weight
    model = model.to(device=weight.device, dtype=weight.dtype).eval()
    return model, clip_tokenizer(encoder.context_length)


# --- transformers -> open_clip ------------------------------------------------------------------------------------
def _split_transformers_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(text-model tensors without ``text_model.``, projection weight or None) of a ``CLIPTextModel`` or
    ``CLIPTextModelWithProjection`` state dict, with or without the ``text_model.`` prefix."""
    inner: dict[str, torch.Tensor] = {}
    projection = None
    for key, value in state.items():
        if key == _HF_PROJECTION:
            projection = value
            continue
        name = key.removeprefix(_HF_PREFIX)
        if name in inner:
            raise ValueError(f"transformers state dict holds {name!r} both with and without the text_model. prefix")
        if name not in _IGNORED_HF_KEYS:
            inner[name] = value
    return inner, projection


class _KeyTaker:
    """Tensors of a transformers state dict taken by name, each remembered, so the untaken ones can be named (no key
    is dropped silently); a missing name is a ValueError with ``missing(name)`` as its message."""

    def __init__(self, inner: dict[str, torch.Tensor], missing: Callable[[str], str]):
        self.inner, self.missing, self.used = inner, missing, set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.inner:
            raise ValueError(self.missing(name))
        self.used.add(name)
        return self.inner[name]

    def left(self) -> list[str]:
        return sorted(set(self.inner) - self.used)


def from_transformers_state_dict(
    state: dict[str, torch.Tensor], encoder: TextEncoder, strict: bool = True
) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` (or ``CLIPTextModel``) state dict as ``encoder``'s own state
    dict (``text.*`` keys: ``encoder.load_state_dict(result)`` takes it). Every key is mapped, none left over; a
    missing, extra or wrongly shaped one is a ValueError naming it.

    A plain ``CLIPTextModel`` has no projection, so the pooled output cannot be reproduced: when ``encoder``'s tower
    has a projection that is an error if ``strict``, otherwise ``encoder``'s current projection is kept (e.g. to
    use the hidden states only, as the released decoder does).
    """
    _check_convertible(encoder)
    inner, projection = _split_transformers_state(state)
    take = _KeyTaker(
        inner, lambda name: f"transformers state dict has no {_HF_PREFIX}{name} (needed by {encoder.model_name!r})"
    )

    own = encoder.text.state_dict()
    result: dict[str, torch.Tensor] = {}
    for key, current in own.items():
        if (name := _hf_name(key)) is not None:
            value = take(name)
        elif (names := _in_proj_names(key)) is not None:
            value = torch.cat([take(name) for name in names], dim=0)
        elif key in ("text_projection", "text_projection.weight"):
            if projection is None:
                if strict:
                    raise ValueError(
                        f"transformers state dict has no {_HF_PROJECTION} (a CLIPTextModel) but {encoder.model_name!r}"
                        " projects its pooled output: pass strict=False to keep the encoder's own projection"
                    )
                value = current
            else:
                value = projection.t() if key == "text_projection" else projection
        else:
            raise ValueError(f"open_clip text-tower key {key!r} has no transformers CLIP counterpart")
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(
                f"transformers weights for {key!r} have shape {tuple(value.shape)}, {encoder.model_name!r} needs "
                f"{tuple(current.shape)}"
            )
        result["text." + key] = value.detach().contiguous()
    left = take.left()
    if projection is not None and encoder.text.text_projection is None:
        left.append(_HF_PROJECTION)
    if left:
        raise ValueError(f"transformers state dict key {left[0]!r} has no open_clip counterpart ({len(left)} left)")
    return result


def _open_clip_model_config(hf_config: Any, with_projection: bool) -> dict:
    """An open_clip model config (text tower only; ``vision_cfg`` is a never-built placeholder) matching a
    ``CLIPTextConfig``."""
    width, inner = int(hf_config.hidden_size), int(hf_config.intermediate_size)
    text_cfg: dict[str, Any] = {
        "context_length": int(hf_config.max_position_embeddings),
        "vocab_size": int(hf_config.vocab_size),
        "width": width,
        "heads": int(hf_config.num_attention_heads),
        "layers": int(hf_config.num_hidden_layers),
    }
    if inner != 4 * width:
        text_cfg["mlp_ratio"] = inner / width
        if int(width * text_cfg["mlp_ratio"]) != inner:
            raise ValueError(f"open_clip cannot express an MLP of {inner} for width {width}")
    eos = hf_config.eos_token_id
    if eos not in (2, int(hf_config.vocab_size) - 1):  # 2: transformers' legacy argmax pooling
        text_cfg.update(pool_type="eos", eos_id=int(eos))
    if not with_projection:
        text_cfg["proj_type"] = "none"
    eps = float(hf_config.layer_norm_eps)
    if eps != 1e-5:
        text_cfg["norm_kwargs"] = {"eps": eps}
    if hf_config.hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"open_clip has no {hf_config.hidden_act!r} activation (gelu and quick_gelu only)")
    model_cfg: dict[str, Any] = {
        "embed_dim": int(hf_config.projection_dim) if with_projection else width,
        "vision_cfg": dict(_PLACEHOLDER_VISION_CFG),
        "text_cfg": text_cfg,
    }
    if hf_config.hidden_act == "quick_gelu":
        model_cfg["quick_gelu"] = True
    return model_cfg


def _known_model(model_cfg: dict) -> str | None:
    """The first of :data:`KNOWN_MODELS` whose text tower is ``model_cfg``'s, up to the context length
    (``TextEncoderConfig.context_length`` sets that). Many open_clip models share a text tower (ViT-H-14's is also
    convnext_xxlarge's, ViT-g-14's, ...): only these names, the ones text-to-image models use, are matched."""
    wanted = CLIPTextCfg(**{**model_cfg["text_cfg"], "context_length": 0})
    available = set(open_clip.list_models()) | {TINY_MODEL_NAME}
    for name in (name for name in KNOWN_MODELS if name in available):
        candidate = open_clip_model_config(name)
        text_cfg = CLIPTextCfg(**{**candidate["text_cfg"], "context_length": 0})
        same_head = candidate.get("embed_dim") == model_cfg["embed_dim"] or text_cfg.proj_type == "none"
        quick_gelu = bool(candidate.get("quick_gelu", False)) == bool(model_cfg.get("quick_gelu", False))
        if text_cfg == wanted and same_head and quick_gelu:
            return name
    return None


def default_config_dir() -> Path:
    """Where :func:`from_transformers` writes generated open_clip model configs when given no ``out_dir``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "lit_wuerstchen" / "open_clip"


def _config_for(hf_config: Any, with_projection: bool, out_dir: Path | None) -> TextEncoderConfig:
    model_cfg = _open_clip_model_config(hf_config, with_projection)
    context_length = model_cfg["text_cfg"]["context_length"]
    name = _known_model(model_cfg)
    if name is not None:
        known_length = open_clip_model_config(name)["text_cfg"].get("context_length", 77)
        return TextEncoderConfig(
            model_name=name, pretrained=None, context_length=None if context_length == known_length else context_length
        )
    text = json.dumps(model_cfg, indent=4, sort_keys=True) + "\n"
    name = "hf-clip-text-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    path = (out_dir if out_dir is not None else default_config_dir()) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)
    return TextEncoderConfig(model_name=name, pretrained=None, model_config_file=str(path))


def _load_transformers_model(folder: Path):
    transformers = _transformers()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no transformers config.json in {folder}")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("model_type") != "clip_text_model":
        raise ValueError(f"{folder} holds a {config.get('model_type')!r} model, not a CLIP text model")
    with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls.from_pretrained(folder)


def from_transformers(
    source: str | os.PathLike | nn.Module,
    config: TextEncoderConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    strict: bool = True,
) -> TextEncoder:
    """A :class:`TextEncoder` (open_clip) holding the weights of a transformers ``CLIPTextModel`` or
    ``CLIPTextModelWithProjection`` (a loaded model, or a folder such as a diffusers pipeline's ``text_encoder/``).

    ``config`` None: the open_clip architecture is derived from the transformers config. When it is one of
    :data:`KNOWN_MODELS` (the shipped tiny model, ViT-bigG-14, ViT-H-14 with projection, ...) up to the context
    length, that model name is used. Otherwise an open_clip model-config JSON is written, named ``hf-clip-text-<hash>``
    after its content (the same architecture always gets the same file), into ``out_dir`` or, without one, into
    :func:`default_config_dir` (``~/.cache/lit_wuerstchen/open_clip``), and the config's ``model_config_file``
    names it. A plain ``CLIPTextModel`` (no projection) becomes a tower without projection (``proj_type: none``),
    whose pooled output is transformers' ``pooler_output``. Given a ``config``, it must describe the same
    architecture (checked); ``strict`` is :func:`from_transformers_state_dict`'s.

    ``out_dir``: the weights are also written there as ``text_encoder.safetensors`` and the returned encoder's
    ``config.weights_file`` names that file, so the config alone (e.g. as Stage C's ``text_encoder``) reloads
    these weights anywhere the folder is. Without ``out_dir`` the config names no weights (``random_init``):
    save them and set ``weights_file`` before training on the encoder.
    """
    from safetensors.torch import save_file

    out = Path(out_dir) if out_dir is not None else None
    model = _load_transformers_model(Path(source)) if isinstance(source, (str, os.PathLike)) else source
    state = model.state_dict()
    hf_config = model.config
    with_projection = _HF_PROJECTION in state
    config = _config_for(hf_config, with_projection, out) if config is None else dataclasses.replace(config)
    encoder = TextEncoder(config)
    ours = transformers_config(encoder).to_dict()
    for field in _COMPARED_CONFIG_FIELDS:
        theirs = getattr(hf_config, field)
        if ours[field] != theirs:
            raise ValueError(f"{config.model_name!r} has {field}={ours[field]!r}, the transformers model {theirs!r}")
    encoder.load_state_dict(from_transformers_state_dict(state, encoder, strict=strict), strict=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        weights = out / "text_encoder.safetensors"
        save_file({key: value.contiguous() for key, value in encoder.state_dict().items()}, str(weights))
        config.weights_file = str(weights)
    return encoder


# --- vision tower: transformers -> open_clip (Stable Cascade's image conditioning) ---------------------------------
HF_VISION_PREFIX = "vision_model."
_HF_VISUAL_PROJECTION = "visual_projection.weight"
_VISION_TOP_RENAMES = {
    "class_embedding": "embeddings.class_embedding",
    "conv1.weight": "embeddings.patch_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",  # sic: transformers' name
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}


def vision_from_transformers_state_dict(
    state: dict[str, torch.Tensor], visual: nn.Module, source: str = "transformers state dict"
) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPVisionModelWithProjection`` (or full ``CLIPModel``) state dict as the state dict of the
    open_clip ``VisionTransformer`` ``visual`` (no prefix). The text half of a ``CLIPModel`` (``text_model.*``,
    ``text_projection``, ``logit_scale``) is skipped; every vision key is mapped, none left over, shapes checked: a
    missing, extra or wrongly shaped one is a ValueError naming it. ``visual_projection.weight`` ``[embed, width]``
    becomes open_clip's ``proj`` ``[width, embed]`` (used as ``x @ proj``)."""
    inner = {
        key[len(HF_VISION_PREFIX) :]: value
        for key, value in state.items()
        if key.startswith(HF_VISION_PREFIX) and key[len(HF_VISION_PREFIX) :] not in _IGNORED_HF_KEYS
    }
    take = _KeyTaker(inner, lambda name: f"{source} has no {HF_VISION_PREFIX}{name}")

    result: dict[str, torch.Tensor] = {}
    for key, current in visual.state_dict().items():
        if key in _VISION_TOP_RENAMES:
            value = take(_VISION_TOP_RENAMES[key])
        elif key == "proj":
            if _HF_VISUAL_PROJECTION not in state:
                raise ValueError(f"{source} has no {_HF_VISUAL_PROJECTION} (a CLIPVisionModel without projection)")
            value = state[_HF_VISUAL_PROJECTION].t()
        elif (name := _hf_name(key)) is not None and name.startswith("encoder."):  # per-layer renames are shared
            value = take(name)
        elif (names := _in_proj_names(key)) is not None:
            value = torch.cat([take(name) for name in names], dim=0)
        else:
            raise ValueError(f"open_clip vision-tower key {key!r} has no transformers CLIP counterpart")
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(
                f"{source}: weights for {key!r} have shape {tuple(value.shape)}, the tower needs {tuple(current.shape)}"
            )
        result[key] = value.detach().contiguous()
    left = take.left()
    if left:
        raise ValueError(f"{source} key {HF_VISION_PREFIX}{left[0]} has no open_clip counterpart ({len(left)} left)")
    return result
