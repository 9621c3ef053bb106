"""Loading and saving the zoo's models: Hugging Face directories (config.json + safetensors) and in-memory
transformers models. safetensors only (never pickle), never the network. The whole state dict is mapped and
checked (missing, unexpected and mis-shaped weights, by name) before anything is loaded."""

import json
import os
import re

import torch

from fastllm.models.llama import FAMILIES as LLAMA_FAMILIES
from fastllm.models.llama import Llama, LlamaConfig

SUPPORTED = (*LLAMA_FAMILIES,)


def _family(d: dict):
    mt = d.get("model_type")
    if mt in LLAMA_FAMILIES:
        return LlamaConfig, Llama
    raise ValueError(f"unknown model_type {mt!r}; fastllm.models supports {', '.join(SUPPORTED)}")


# --------------------------------------------------------------------------------------------------
# Key mapping, Llama family: HF (model.layers.{i}.self_attn.q_proj.weight, ...) <-> ours (q/k/v concatenated).

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PLAIN = {"input_layernorm.weight": "input_layernorm", "post_attention_layernorm.weight": "post_attention_layernorm",
          "self_attn.o_proj.weight": "self_attn.o_proj.weight", "self_attn.o_proj.bias": "self_attn.o_proj.bias",
          **{f"mlp.{p}_proj.{t}": f"mlp.{p}_proj.{t}"
             for p in ("gate", "up", "down") for t in ("weight", "bias")}}  # fmt: skip


def llama_from_hf_state(sd: dict, c: LlamaConfig) -> dict:
    out, qkv = {}, {}
    unexpected = []
    for name, t in sd.items():
        if name == "model.embed_tokens.weight":
            out["embed_tokens.weight"] = t
        elif name == "model.norm.weight":
            out["norm"] = t
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                out["lm_head.weight"] = t
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # (a buffer some versions saved; recomputed from the config)
        elif m := _LAYER.match(name):
            i, rest = m.groups()
            if rest in _PLAIN:
                out[f"layers.{i}.{_PLAIN[rest]}"] = t
            elif (mq := re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)) is not None:
                qkv[(i, mq.group(2), mq.group(1))] = t
            else:
                unexpected.append(name)
        else:
            unexpected.append(name)
    for i in range(c.num_hidden_layers):
        for kind in ("weight", "bias"):
            parts = [qkv.pop((str(i), kind, p), None) for p in "qkv"]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                missing = [f"model.layers.{i}.self_attn.{p}_proj.{kind}" for p, t in zip("qkv", parts, strict=True)
                           if t is None]  # fmt: skip
                raise ValueError(f"missing weights: {', '.join(missing)}")
            out[f"layers.{i}.self_attn.qkv_proj.{kind}"] = torch.cat(parts)
    unexpected += [f"model.layers.{i}.self_attn.{p}_proj.{kind}" for (i, kind, p) in qkv]
    if unexpected:
        raise ValueError(f"unexpected weights for a {c.model_type} model: {', '.join(sorted(unexpected)[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))  # fmt: skip
    return out


def llama_to_hf_state(model: Llama) -> dict:
    c, out = model.config, {}
    inv_plain = {v: k for k, v in _PLAIN.items()}
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    for name, t in model.state_dict().items():
        t = t.detach()
        if name == "embed_tokens.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm":
            out["model.norm.weight"] = t
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                out[name] = t
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest.startswith("self_attn.qkv_proj."):
                kind = rest.rsplit(".", 1)[1]
                for p, part in zip("qkv", t.split((q, kv, kv)), strict=True):
                    out[f"model.layers.{i}.self_attn.{p}_proj.{kind}"] = part
            else:
                out[f"model.layers.{i}.{inv_plain[rest]}"] = t
    return {k: v.contiguous().clone() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------


def _build(d: dict, state: dict, dtype, device):
    config_cls, model_cls = _family(d)
    config = config_cls.from_hf(d)
    mapped = llama_from_hf_state(state, config)
    with torch.device("meta"):
        model = model_cls(config, dtype=dtype)
    expected = {k: v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise ValueError(f"missing weights: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    extra = sorted(set(mapped) - set(expected))
    if extra:
        raise ValueError(f"unexpected weights: {', '.join(extra[:8])}")
    for k, v in expected.items():
        if tuple(mapped[k].shape) != tuple(v.shape):
            raise ValueError(f"weight {k}: shape {tuple(mapped[k].shape)} does not match the config's {tuple(v.shape)}")
    # copies, made outside inference mode: our parameters are never views of the source's, and never inference
    # tensors (those have no version counter, so the packed-weight cache could not keep them)
    with torch.inference_mode(False):
        tensors = {k: mapped[k].to(device=device or "cpu", dtype=dtype, copy=True) for k in expected}
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    cos, sin = model.rope_cos, model.rope_sin
    model.rope_cos = torch.empty(0)  # (meta buffers: rebuilt on the device)
    model.rope_sin = torch.empty(0)
    from fastllm.nn.attention import rope_inv_freq, rope_tables

    cos, sin = rope_tables(config.max_seq_len, rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
    model.rope_cos, model.rope_sin = cos.to(device or "cpu"), sin.to(device or "cpu")
    for blk in model.layers:
        blk.self_attn.rope = (model.rope_cos, model.rope_sin)
    return model.eval()


def _dtype_of(d: dict):
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"config dtype {name!r} is not a floating dtype")
    return dt


def from_hf(hf_model, dtype=None, device=None):
    """Our model from an in-memory transformers model (its config and weights; the weights are copied)."""
    if not hasattr(hf_model, "config") or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"from_hf: expected a transformers model, got {type(hf_model).__name__}")
    d = hf_model.config.to_dict()
    state = hf_model.state_dict()
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    return _build(d, state, dtype, device)


def from_pretrained(path, dtype=None, device=None):
    """Our model from a local Hugging Face directory: config.json + model.safetensors (or a sharded
    model.safetensors.index.json). dtype defaults to the config's dtype (else float32)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"from_pretrained: no config.json in {path!r}")
    with open(cfg) as f:
        d = json.load(f)
    _family(d)  # unknown model_type: raise before reading weights
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
        raise ValueError(f"from_pretrained: no model.safetensors or model.safetensors.index.json in {path!r} "
                         "(only safetensors are read, never pickle files)")  # fmt: skip
    state = {}
    for fn in files:
        state.update(load_file(fn))
    return _build(d, state, dtype or _dtype_of(d), device)


def save_pretrained(model, path) -> None:
    """A Hugging Face directory (config.json + model.safetensors, HF key names) that from_pretrained and
    transformers' AutoModelForCausalLM.from_pretrained both load."""
    from safetensors.torch import save_file

    if not isinstance(model, Llama):
        raise TypeError(f"save_pretrained: expected a fastllm.models model, got {type(model).__name__}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    d = dict(model.config.hf)
    d["dtype"] = str(model.embed_tokens.weight.dtype).replace("torch.", "")
    d.pop("torch_dtype", None)
    d.pop("quantization_config", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2, default=str)
    save_file(llama_to_hf_state(model), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
