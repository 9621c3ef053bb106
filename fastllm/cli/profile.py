"""`python -m fastllm profile MODEL`: a model as eager, SDPA, torch.compile and fastllm side by side (fastllm.profile).

MODEL is one of
  a zoo name   random weights (seed 0, Hugging Face's init) at a named size: ZOO below, e.g. minilm, bert-base,
               vit-b16, smollm2-135m, and the tiny ones bert-tiny, vit-tiny, llama-tiny (for smoke tests);
  a directory  a local Hugging Face model (config.json + weights; nothing is downloaded);
  module:function  a function (importable from the current directory) returning (model, example_inputs), the
               inputs a tuple of positional arguments, a dict of keyword arguments or one tensor.
Inputs of zoo and directory models: token ids (--batch x --seq, random, attention mask of ones) or images
(--batch x 3 x image_size^2). Variants: eager and sdpa (the HF model under each attn_implementation), torch.compile
(--compile, of the sdpa one), fastllm.accelerate (the HF model accelerated in place, on a copy) and fastllm (zoo):
fastllm.models.from_hf of the same weights. --accelerate / --zoo: only that fastllm variant (default: both where
the family has a zoo model). --dtype casts the weights (and image inputs). --generate N (decoders): also greedy
generation of N tokens per variant (HF generate; fastllm.models.generate for the zoo model), time to first token and
per-token decode measured apart, and the share of tokens equal to eager's.
"""

import importlib
import sys
from pathlib import Path

from fastllm.cli import UsageError

# name -> (transformers config class, model class, config arguments)
ZOO = {
    "bert-tiny": ("BertConfig", "BertModel", dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=128)),
    "minilm": ("BertConfig", "BertModel", dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                               num_attention_heads=12, intermediate_size=1536)),
    "bert-base": ("BertConfig", "BertModel", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                                  num_attention_heads=12, intermediate_size=3072)),
    "vit-tiny": ("ViTConfig", "ViTModel", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=128, image_size=32, patch_size=8)),
    "vit-b16": ("ViTConfig", "ViTModel", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                              intermediate_size=3072, image_size=224, patch_size=16)),
    "llama-tiny": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, head_dim=16)),
    "smollm2-135m": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)),
}  # fmt: skip
DTYPES = ("float32", "bfloat16", "float16")
VISION = ("vit",)  # model_type of image models (pixel_values inputs)
ZOO_TYPES = ("bert", "vit", "llama", "mistral", "qwen2", "gpt2")  # model_type with a fastllm.models family


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("profile", help="a model as eager / sdpa / torch.compile / fastllm: time, categories, traces",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("model", metavar="MODEL", help=f"a zoo name ({', '.join(ZOO)}), a local HF directory or "
                   "module:function")  # fmt: skip
    which = p.add_mutually_exclusive_group()
    which.add_argument("--accelerate", action="store_true", help="fastllm variant: fastllm.accelerate only")
    which.add_argument("--zoo", action="store_true", help="fastllm variant: the fastllm.models zoo model only")
    p.add_argument("--compile", action="store_true", help="add a torch.compile variant (compiles for seconds)")
    p.add_argument("--batch", type=_positive, default=1, help="batch size (default 1)")
    p.add_argument("--seq", type=_positive, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--rounds", type=_positive, default=None, help="timed rounds (default: about 2 s per variant)")
    p.add_argument("--trace", metavar="DIR", help="write a Chrome trace per variant to DIR")
    p.add_argument("--generate", metavar="N", type=_positive, default=0,
                   help="decoder models: also generate N tokens (time to first token, per-token decode)")  # fmt: skip


def _positive(s: str) -> int:
    import argparse

    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} must be at least 1")
    return v


def _transformers():
    from fastllm.testing import import_torchvision

    if import_torchvision() == "without compiled ops":  # (else transformers itself fails to import: testing.py)
        print("fastllm profile: torchvision's compiled ops do not load beside this torch (PyPI's CUDA build on a CPU "
              "torch); loaded its Python part without them", file=sys.stderr)  # fmt: skip
    try:
        import transformers
    except ImportError:
        raise UsageError("zoo and Hugging Face directory models need transformers: pip install transformers") from None
    return transformers


def _inputs_for(config, model_type: str, batch: int, seq: int, dtype, device):
    import torch

    g = torch.Generator().manual_seed(0)
    if model_type in VISION:
        size = config.image_size
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g).to(device=device, dtype=dtype)}
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _zoo_adapter(ours, model_type: str):
    """Call a fastllm.models model with the HF keyword inputs."""
    if model_type in VISION:
        return lambda pixel_values: ours(pixel_values)
    if model_type == "bert":
        return lambda input_ids, attention_mask: ours(input_ids, attention_mask)
    return lambda input_ids, attention_mask: ours(input_ids)  # decoders: full attention mask, causal


def load(args):
    """(model, inputs, extra_variants, description) for MODEL."""
    import torch

    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here")
    spec = args.model
    if spec in ZOO:
        tf = _transformers()
        cfg_cls, model_cls, kw = ZOO[spec]
        torch.manual_seed(0)
        config = getattr(tf, cfg_cls)(**kw)
        extra = {"add_pooling_layer": False} if model_cls in ("BertModel", "ViTModel") else {}
        model = getattr(tf, model_cls)(config, **extra).eval()
        what = f"{spec} (random weights)"
    elif Path(spec).is_dir():
        tf = _transformers()
        if not (Path(spec) / "config.json").is_file():
            raise UsageError(f"{spec} is a directory without config.json (not a Hugging Face model)")
        config = tf.AutoConfig.from_pretrained(spec)
        auto = tf.AutoModelForCausalLM if config.model_type in ("llama", "mistral", "qwen2", "gpt2") else tf.AutoModel
        try:
            model = auto.from_pretrained(spec).eval()
        except Exception as e:
            raise UsageError(f"cannot load {spec}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        what = f"{spec} ({config.model_type})"
    elif ":" in spec:
        return _load_function(spec, device, args)
    else:
        raise UsageError(f"MODEL {spec!r} is not a zoo name ({', '.join(ZOO)}), a local directory or module:function")
    model = model.to(device=device, dtype=dtype)
    mt = config.model_type
    inputs = _inputs_for(config, mt, args.batch, args.seq, dtype, device)
    extra = {}
    if mt in ZOO_TYPES and not args.accelerate:
        import fastllm

        extra["fastllm (zoo)"] = _zoo_adapter(fastllm.models.from_hf(model).eval(), mt)
    shape = f"batch {args.batch} x 3 x {config.image_size}^2" if mt in VISION else f"{args.batch} x {args.seq} tokens"
    return model, inputs, extra, f"{what}, {shape}, {args.dtype} on {device}"


def _load_function(spec: str, device: str, args):
    mod_name, _, fn_name = spec.partition(":")
    if "" in (mod_name, fn_name):
        raise UsageError(f"MODEL {spec!r}: expected module:function")
    sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"MODEL {spec!r}: {type(e).__name__}: {e}") from None
    got = fn()
    if not (isinstance(got, tuple) and len(got) == 2):
        raise UsageError(f"MODEL {spec!r}: the function must return (model, example_inputs)")
    model, inputs = got
    return model, inputs, {}, f"{spec}"


DECODERS = ("llama", "mistral", "qwen2", "gpt2")


def generate_variants(model, inputs, args) -> dict:
    """name -> gen(n): HF generate under eager / sdpa attention, HF generate on the accelerate'd copy, fastllm's
    generate on the zoo model; greedy, exactly n new tokens (no eos)."""
    import torch

    import fastllm
    from fastllm.profiling import _shared_copy

    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def hf_gen(m):
        m.generation_config.eos_token_id = None  # every variant generates exactly n tokens
        m.generation_config.pad_token_id = 0

        def gen(n):
            with torch.inference_mode():
                return m.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        return gen

    out = {}
    for attn in ("eager", "sdpa"):
        m = _shared_copy(model)
        m.set_attn_implementation(attn)
        out[attn] = hf_gen(m)
    if not args.zoo:
        out["fastllm.accelerate"] = hf_gen(fastllm.accelerate(_shared_copy(model)))
    if not args.accelerate:
        ours = fastllm.models.from_hf(model).eval()
        out["fastllm (zoo)"] = lambda n: fastllm.models.generate(ours, ids, mask, max_new_tokens=n)
    return out


def run(args) -> int:
    from fastllm.profiling import profile, profile_generate

    model, inputs, extra, description = load(args)
    if args.generate:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in DECODERS:
            raise UsageError(f"--generate needs a decoder model ({', '.join(DECODERS)}); {args.model} is {mt or '?'}")
        if args.generate < 2:
            raise UsageError("--generate N needs N >= 2 (the first token, then at least one decode step)")
    result = profile(model, inputs, compile=args.compile, accelerate=not args.zoo, extra_variants=extra,
                     rounds=args.rounds, trace_dir=args.trace, description=description)  # fmt: skip
    if args.generate:
        gens = generate_variants(model, inputs, args)
        result.generation = profile_generate(gens, args.batch, args.generate, rounds=args.rounds or 3,
                                             device=result.device)  # fmt: skip
        result.new_tokens = args.generate
    print(result.table())
    return 0
