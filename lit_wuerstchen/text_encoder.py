"""Frozen open_clip text encoder for Stage C (and the paper's Stage B) conditioning (DESIGN.md §1, §2, §7).

Only the text tower is built (an open_clip ``TextTransformer``); the vision tower is never instantiated, so
ViT-bigG-14 costs its ~0.7B text parameters, not the full 2.5B. Weights come from

- ``weights_file``: a local checkpoint (``.safetensors``, ``.bin``, ``.pt``/``.pth``): a full open_clip CLIP
  state dict (``transformer.*``, ``token_embedding.*``, ...; vision keys are ignored), open_clip's custom-text
  layout (``text.*``) or this module's own ``state_dict()`` (also ``text.*``). Takes precedence over
  ``pretrained``.
- ``pretrained``: an open_clip pretrained tag (``open_clip.list_pretrained_tags_by_model(model_name)``),
  resolved the way open_clip resolves it (a Hugging Face Hub repo/file, else a URL) and read from the local
  cache. Offline (:func:`lit_wuerstchen.offline.is_offline`) a missing file fails at once with a message that
  says where the file is expected; online it is downloaded once and a failed download gives the same message.
- neither: random initialisation (toy configs, tests).

The shipped ``wuerstchen-tiny-clip`` config (``lit_wuerstchen/configs/open_clip/``) is registered with open_clip
automatically; other custom architectures come in through ``model_config_file``.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

from lit_wuerstchen.offline import is_offline

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "open_clip"
TINY_MODEL_NAME = "wuerstchen-tiny-clip"

_REGISTERED_CONFIGS: set[Path] = set()
_TOKENIZERS: dict[tuple[str, int], object] = {}


def register_model_config(path: str | os.PathLike) -> None:
    """Register an open_clip model-config JSON (its model name is the file stem, as in open_clip)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config file not found: {path}")
    if path not in _REGISTERED_CONFIGS:
        open_clip.add_model_config(path)
        _REGISTERED_CONFIGS.add(path)


def hf_hub_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, read from the environment at call time.

    ``huggingface_hub.constants.HF_HUB_CACHE`` is frozen at import; re-reading ``HF_HUB_CACHE`` /
    ``HUGGINGFACE_HUB_CACHE`` / ``HF_HOME`` here lets a process (or a test) point the cache elsewhere later.
    Lookup and download both use this folder, so they always agree.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expanduser(os.path.expandvars(os.environ[name])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"]))) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _pretrained_candidates(pretrained_cfg: dict) -> tuple[str, list[str]] | None:
    """``(repo_id, filenames in preference order)`` for a tag hosted on the HF Hub (as open_clip resolves it)."""
    hf_hub = pretrained_cfg.get("hf_hub", "")
    if not hf_hub:
        return None
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    candidates = []
    # open_clip prefers a safetensors sibling of a pickled checkpoint (pretrained._get_safe_alternatives)
    if filename == HF_WEIGHTS_NAME:
        candidates.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        candidates.append(filename[:-4] + ".safetensors")
    candidates.append(filename)
    return repo_id, candidates


def _missing_message(model_name: str, tag: str, expected: list[str], reason: str) -> str:
    where = "\n".join(f"    {p}" for p in expected)
    return (
        f"Pretrained open_clip weights for model {model_name!r}, tag {tag!r} are not available: {reason}.\n"
        f"Expected one of:\n{where}\n"
        f"Fill the cache on a machine with network access, e.g.\n"
        f"    python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{tag}')\"\n"
        f"and copy the Hugging Face cache folder over (or set HF_HUB_CACHE / HF_HOME to where it lives), "
        f"or pass weights_file=<path to a local open_clip checkpoint> (.safetensors/.bin/.pt), "
        f"or pretrained=None for random initialisation."
    )


def resolve_pretrained(model_name: str, tag: str) -> str:
    """Local path of open_clip's ``(model_name, tag)`` checkpoint, downloading it only when online.

    The tag is resolved with ``open_clip.get_pretrained_cfg``. Hub-hosted tags (most) are looked up with
    ``huggingface_hub.try_to_load_from_cache`` in :func:`hf_hub_cache_dir` (safetensors first, as open_clip does);
    URL-hosted tags in ``~/.cache/clip/<file name>`` (open_clip's URL cache). Offline and not cached: raises
    :class:`RuntimeError` immediately, with no network call.
    """
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        raise ValueError(
            f"Unknown open_clip pretrained tag {tag!r} for model {model_name!r}. "
            f"Known tags: {open_clip.list_pretrained_tags_by_model(model_name)}. "
            f"For a local checkpoint use weights_file=..."
        )
    if "file" in cfg:
        return cfg["file"]
    cache_dir = hf_hub_cache_dir()
    hub = _pretrained_candidates(cfg)
    if hub is not None:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filenames = hub
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--")) / "snapshots" / "<revision>"
        expected = [str(repo_folder / f) for f in filenames]
    else:
        url = cfg.get("url", "")
        if not url:
            raise ValueError(f"open_clip pretrained config for {model_name!r}/{tag!r} names no file: {cfg}")
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if path.is_file():
            return str(path)
        expected = [str(path)]

    if is_offline():
        raise RuntimeError(_missing_message(model_name, tag, expected, "not in the local cache and offline mode is on (HF_HUB_OFFLINE / LIT_WUERSTCHEN_OFFLINE)"))
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=str(cache_dir) if hub is not None else None)
    except Exception as err:
        raise RuntimeError(_missing_message(model_name, tag, expected, f"not in the local cache and the download failed ({err})")) from err
    if not path or not os.path.isfile(path):
        raise RuntimeError(_missing_message(model_name, tag, expected, "the download returned no file"))
    return path


def _load_text_state_dict(path: str, keys: set[str]) -> dict[str, torch.Tensor]:
    """Read the text-tower tensors of a checkpoint (vision weights are skipped where the format allows)."""
    prefixes = ("", "text.", "module.", "module.text.", "model.", "model.text.")

    def wanted(key: str) -> str | None:
        for prefix in prefixes:
            if key.startswith(prefix) and key[len(prefix):] in keys:
                return key[len(prefix):]
        return None

    if path.endswith(".safetensors"):
        from safetensors import safe_open

        out = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                name = wanted(key)
                if name is not None:
                    out[name] = f.get_tensor(key)
        return out
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return {name: value for key, value in checkpoint.items() if (name := wanted(key)) is not None}


def resolve_open_clip_model(
    model_name: str, pretrained: str | None, weights_file: str | None, model_config_file: str | None
) -> tuple[dict, str | None]:
    """(open_clip model config, weights file to load or None for random init), before anything is built.

    Registers ``model_config_file`` (automatically for the shipped tiny model); ``weights_file`` wins over the
    ``pretrained`` tag, whose file is looked up (or, online, downloaded) by :func:`resolve_pretrained`. A missing
    file or an unknown model fails here, fast.
    """
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
    if weights_file is not None:
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"open_clip weights_file not found: {weights_file}")
        return model_cfg, str(weights_file)
    return model_cfg, resolve_pretrained(model_name, pretrained) if pretrained else None


class TextEncoder(nn.Module):
    """Frozen open_clip text tower returning per-token hidden states and the pooled text embedding.

    ``forward(prompts)`` returns ``(hidden_states [B, L, width], pooled [B, embed_dim])``:

    - ``hidden_states``: the token states after the last transformer block, passed through the final LayerNorm
      when ``final_layer_norm`` (Würstchen v2, diffusers' ``last_hidden_state``) or taken before it when not
      (Stable Cascade's ``hidden_states[-1]``).
    - ``pooled``: open_clip's text embedding, i.e. the final-LayerNorm'd EOT token times the text projection,
      **not** L2-normalised (as ``encode_text(normalize=False)`` and HF ``text_embeds``); always taken after the
      final LayerNorm whatever ``final_layer_norm`` says.

    Always frozen and in eval mode (``train()`` keeps it in eval), and runs under ``torch.no_grad()``.
    """

    def __init__(
        self,
        model_name: str = "ViT-bigG-14",
        pretrained: str | None = "laion2b_s39b_b160k",
        weights_file: str | None = None,
        model_config_file: str | None = None,
        final_layer_norm: bool = True,
        context_length: int | None = None,
    ):
        super().__init__()
        self.model_name = model_name
        self.final_layer_norm = final_layer_norm
        model_cfg, checkpoint = resolve_open_clip_model(model_name, pretrained, weights_file, model_config_file)
        text_cfg = dict(model_cfg["text_cfg"])
        if text_cfg.get("hf_model_name"):
            raise ValueError(f"{model_name!r} has a Hugging Face text tower; only open_clip TextTransformer towers are supported")
        if context_length is not None:
            text_cfg["context_length"] = context_length

        text = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
        if not isinstance(text, TextTransformer):
            raise ValueError(f"{model_name!r} does not build an open_clip TextTransformer")
        self.text = text
        if checkpoint is not None:
            state = _load_text_state_dict(checkpoint, set(text.state_dict().keys()))
            if not state:
                raise ValueError(f"{checkpoint} holds no text-tower weights for {model_name!r}")
            from open_clip.model import resize_text_pos_embed

            resize_text_pos_embed(state, text)
            text.load_state_dict(state, strict=True)
        self.context_length = text.context_length
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
        return _TOKENIZERS[key](list(prompts)).long()

    @torch.no_grad()
    def forward(self, prompts: list[str] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        text = self.text
        tokens = tokens.to(text.token_embedding.weight.device).long()
        x, attn_mask = text._embeds(tokens)  # token + positional embedding, causal (and pad/cls) mask
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
