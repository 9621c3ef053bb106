"""Loading and saving the zoo's models: Hugging Face directories (config.json + safetensors) and in-memory
transformers models. safetensors only (never pickle), never the network.

Each family file gives FAMILIES (its model_type names), a Config with from_hf(dict) / to_hf(), the model class,
HF_IGNORED (a regex of HF keys to skip) and `hf_layout(config)`: our state-dict key -> (its HF keys, split sizes,
transpose); and either HF_PREFIX (the *ForCausalLM prefix a bare base-model checkpoint lacks) or
`hf_state(state, config) -> state` (the family's own key normalisation, e.g. BertModel vs BertForMaskedLM keys).
A family is registered in _FAMILIES below. Loading maps the whole HF state dict through the layout and checks it
(missing, unexpected and mis-shaped weights, by their HF names) before anything is built; the model is made on the
meta device and its weights assigned at the end, so a failed load leaves nothing half-loaded. Saving runs the
layout backwards.
"""

import json
import os
import re

import torch

from fastllm.models import bert, clip, gpt2, llama, vit

_FAMILIES = {mt: (llama.LlamaConfig, llama.Llama, llama) for mt in llama.FAMILIES}
_FAMILIES.update({mt: (gpt2.GPT2Config, gpt2.GPT2, gpt2) for mt in gpt2.FAMILIES})
_FAMILIES.update({mt: (bert.BertConfig, bert.Bert, bert) for mt in bert.FAMILIES})
_FAMILIES.update({mt: (vit.ViTConfig, vit.ViT, vit) for mt in vit.FAMILIES})
_FAMILIES.update({mt: (clip.CLIPConfig, clip.CLIP, clip) for mt in clip.FAMILIES})


def _family(d: dict):
    mt = d.get("model_type")
    if mt not in _FAMILIES:
        raise ValueError(f"unknown model_type {mt!r}; fastllm.models supports {', '.join(_FAMILIES)}")
    return _FAMILIES[mt]


def _to_ours(parts: list, split, transpose: bool) -> torch.Tensor:
    t = torch.cat(parts) if split else parts[0]
    return t.t() if transpose else t


def _to_hf(t: torch.Tensor, split, transpose: bool) -> tuple:
    if transpose:
        t = t.t()
    return t.split(split) if split else (t,)


def _with_prefix(state: dict, prefix: str) -> dict:
    """A checkpoint of the bare base model (GPT2Model, LlamaModel: keys without model. / transformer.) as the
    *ForCausalLM keys."""
    if any(k.startswith(prefix) for k in state):
        return state
    return {(k if k == "lm_head.weight" else prefix + k): v for k, v in state.items()}


def _some(names) -> str:
    names = sorted(names)
    return ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")


def _build(d: dict, state: dict, dtype, device):
    config_cls, model_cls, fam = _family(d)
    config = config_cls.from_hf(d)
    state = fam.hf_state(state, config) if hasattr(fam, "hf_state") else _with_prefix(state, fam.HF_PREFIX)
    layout = fam.hf_layout(config)
    with torch.device("meta"):
        model = model_cls(config, dtype=dtype)
    params = model.state_dict()
    # every HF tensor present, of the shape the config implies
    missing, bad, used = [], [], set()
    for ours, (keys, split, transpose) in layout.items():
        want = _to_hf(params[ours], split, transpose)  # meta tensors of the HF shapes
        for k, w in zip(keys, want, strict=True):
            if k not in state:
                missing.append(k)
            elif tuple(state[k].shape) != tuple(w.shape):
                bad.append(f"{k} {tuple(state[k].shape)} (the config implies {tuple(w.shape)})")
            used.add(k)
    if missing:
        raise ValueError(f"missing weights: {_some(missing)}")
    if bad:
        raise ValueError(f"weights of the wrong shape: {'; '.join(bad[:8])}")
    ignored = re.compile(fam.HF_IGNORED)
    # (HF keeps the tied one in state_dict())
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    unexpected = [k for k in state if k not in used and k not in tied and not ignored.search(k)]
    if unexpected:
        raise ValueError(f"unexpected weights for a {config.model_type} model: {_some(unexpected)}")
    ints = [f"{k} ({state[k].dtype})" for k in sorted(used) if not state[k].is_floating_point()]
    if ints:
        raise ValueError(f"weights that are not float: {_some(ints)}")
    # copies, made outside inference mode: our parameters are never views of the source's, and never inference
    # tensors (those have no version counter, so the packed-weight cache could not keep them)
    with torch.inference_mode(False):
        tensors = {ours: _to_ours([state[k] for k in keys], split, transpose).to(device=device or "cpu", dtype=dtype,
                                                                                  copy=True).contiguous()
                   for ours, (keys, split, transpose) in layout.items()}  # fmt: skip
    model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    assert not left, f"hf_layout of {config.model_type} does not cover {left}"
    if device is not None:
        model.to(device)  # (the rotary tables; the weights are there already)
    return model.eval()


def _dtype_of(d: dict) -> torch.dtype:
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"config.json: dtype {name!r} is not a floating dtype")
    return dt


def _check_dtype(fn: str, dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: dtype must be a floating torch.dtype or None, got {dtype!r}")


def from_hf(hf_model, dtype=None, device=None):
    """Our model from an in-memory transformers model (its config and weights; the weights are copied). dtype
    defaults to the HF model's parameter dtype."""
    if not hasattr(hf_model, "config") or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"from_hf: expected a transformers model, got {type(hf_model).__name__}")
    d = hf_model.config.to_dict()
    if dtype is None:
        dtype = next(p.dtype for p in hf_model.parameters() if p.is_floating_point())
    _check_dtype("from_hf", dtype)
    return _build(d, hf_model.state_dict(), dtype, device)


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _shard(path: str, name) -> str:
    """The file of a shard named by the index's weight_map: a .safetensors file given relative to `path`, inside it.
    Refused: pickle files (loading one can run code; fastllm never unpickles), absolute paths and `..` (an index
    must not make us read files elsewhere). The check is on the name, not the resolved path: a Hugging Face cache
    snapshot holds its shards as symlinks into ../../blobs, which are the user's own files."""
    index = "model.safetensors.index.json"
    if not isinstance(name, str) or not name:
        raise ValueError(f"from_pretrained: {index} names a shard {name!r}, not a file name")
    if name.lower().endswith(_PICKLE_SUFFIXES):
        raise ValueError(f"from_pretrained: {index} names the pickle file {name!r}; only safetensors are read, "
                         "never pickle files (loading one can run arbitrary code)")  # fmt: skip
    if not name.endswith(".safetensors"):
        raise ValueError(f"from_pretrained: {index} names {name!r}, not a .safetensors file")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or os.path.splitdrive(name)[0]:
        raise ValueError(f"from_pretrained: {index} names the shard {name!r} outside the model directory "
                         f"{path!r}; shards must be files inside it")  # fmt: skip
    return os.path.join(path, name)


def from_pretrained(path, dtype=None, device=None):
    """Our model from a local Hugging Face directory: config.json + model.safetensors (or a sharded
    model.safetensors.index.json, whose shards must be .safetensors files inside `path`: pickle files and paths
    outside it are refused). dtype defaults to the config's dtype (else float32)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"from_pretrained: no config.json in {path!r}")
    with open(cfg) as f:
        d = json.load(f)
    _family(d)  # unknown model_type: raise before reading weights
    if dtype is None:
        dtype = _dtype_of(d)
    _check_dtype("from_pretrained", dtype)
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"from_pretrained: {index} has no weight_map")
        files = sorted({_shard(path, v) for v in weight_map.values()})
        for fn in files:
            if not os.path.isfile(fn):
                raise ValueError(f"from_pretrained: shard {os.path.basename(fn)} named by the index is missing")
    else:
        raise ValueError(f"from_pretrained: no model.safetensors or model.safetensors.index.json in {path!r} "
                         "(only safetensors are read, never pickle files)")  # fmt: skip
    state = {}
    for fn in files:
        state.update(load_file(fn))
    return _build(d, state, dtype, device)


def save_pretrained(model, path) -> None:
    """A Hugging Face directory (config.json + model.safetensors, HF key names, q/k/v split back, Conv1D weights
    transposed back) that from_pretrained and transformers' AutoModelForCausalLM.from_pretrained both load."""
    from safetensors.torch import save_file

    from fastllm.nn.int8 import Int8Linear

    fam = next((f for _, cls, f in _FAMILIES.values() if type(model) is cls), None)
    if fam is None:
        raise TypeError(f"save_pretrained: expected a fastllm.models model, got {type(model).__name__}")
    quantized = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    if quantized:
        raise ValueError(f"save_pretrained: the model is quantized ({_some(quantized)} are Int8Linear); the HF "
                         "layout holds float weights: save before fastllm.quantize_")  # fmt: skip
    params = model.state_dict()
    out = {}
    for ours, (keys, split, transpose) in fam.hf_layout(model.config).items():
        for k, t in zip(keys, _to_hf(params[ours].detach(), split, transpose), strict=True):
            out[k] = t.to("cpu").contiguous().clone()
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    d = model.config.to_hf()
    d["dtype"] = str(next(iter(out.values())).dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2, default=str)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
