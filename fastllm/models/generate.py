"""Generation for the zoo's decoders (gpt-fast style): a static KV cache, prefill, a decode step, sampling.

    out = generate(model, input_ids, attention_mask=None, max_new_tokens=32)      # (B, S + n) prompt + new tokens
    for tok in generate_stream(model, input_ids, ...): ...                          # (B,) new tokens per step

    cache = model.new_cache(B, S + max_new_tokens)        preallocated once; nothing grows while decoding
    prefill   all rows the same real length: one batched forward over the real tokens (B, L)
              ragged rows (attention_mask): row by row through cache.row(b), so each row's cache holds only its
              real tokens at positions 0..L_b-1 and padding is never attended (HF's left padding + mask computes
              the same positions)
    decode    one forward of (B, 1) tokens per step; row b's token lands at its own position cache.seqlens[b]
    sample    greedy (argmax), or HF's warpers in HF's order: temperature, then top_k, then top_p, then a
              multinomial draw (optionally from `generator`); logits are cast to float32 first, as HF does
    eos       a row that emitted eos gets pad_token_id (default: the first eos id) afterwards; the loop stops
              when every row is done (then the output is shorter than S + max_new_tokens, as HF's)

Everything runs under torch.inference_mode. compile=True runs the decode step through torch.compile (the ops then
go through their registered torch ops, never the direct path); the prefill stays eager.
"""

import functools
import inspect
from collections.abc import Iterator

import torch


def generate(model, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False, temperature=1.0, top_k=None,
             top_p=None, eos_token_id=None, pad_token_id=None, generator=None, *,
             compile=False) -> torch.Tensor:  # fmt: skip
    """(B, S + n) int64: the prompt as given (padding kept) followed by n <= max_new_tokens new tokens per row."""
    stream = generate_stream(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                             eos_token_id, pad_token_id, generator, compile=compile)  # fmt: skip
    new = list(stream)
    # (outside inference mode: the result is an ordinary tensor the caller may use anywhere)
    return torch.cat([input_ids.long(), torch.stack(new, dim=1)], dim=1)


def generate_stream(model, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False, temperature=1.0,
                    top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, generator=None, *,
                    compile=False) -> Iterator[torch.Tensor]:  # fmt: skip
    """An iterator over the new tokens, one (B,) int64 tensor per step. The arguments are validated here, before
    the first token is asked for."""
    spans = _check_prompt(model, input_ids, attention_mask, max_new_tokens)
    sampling = _check_sampling(do_sample, temperature, top_k, top_p, generator)
    eos, pad = _check_eos(model, eos_token_id, pad_token_id)
    return _stream(model, input_ids.long(), spans, max_new_tokens, sampling, eos, pad, compile)


# --------------------------------------------------------------------------------------------------
# the loop


@torch.inference_mode()  # (torch wraps a generator function: the mode is on while it runs, off between steps)
def _stream(model, input_ids, spans, max_new_tokens, sampling, eos, pad, compile) -> Iterator[torch.Tensor]:
    B, S = input_ids.shape
    cache = model.new_cache(B, S + max_new_tokens)
    logits = prefill(model, input_ids, spans, cache)  # (B, V)
    step = _compiled_step() if compile else _Decoder(model, cache)
    eos_t = torch.tensor(eos, device=input_ids.device) if eos else None
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        tok = sample(logits, *sampling)  # (B,)
        if eos_t is not None:
            tok = torch.where(done, pad, tok)  # finished rows emit padding
            done |= torch.isin(tok, eos_t)
        yield tok
        if i + 1 == max_new_tokens or (eos_t is not None and bool(done.all())):
            return
        logits = step(model, tok, cache)


def prefill(model, input_ids: torch.Tensor, spans: list, cache) -> torch.Tensor:
    """Run the prompt through the model into `cache`; the next-token logits (B, V) of every row.

    spans: per row (start, length) of its real tokens in input_ids. Same length everywhere: one forward over the
    (B, L) real tokens; otherwise one forward per row through cache.row(b)."""
    S = input_ids.shape[1]
    lengths = {n for _, n in spans}
    if len(lengths) == 1:
        (L,) = lengths
        if L == S:
            ids = input_ids
        else:  # the same length at different offsets (left and right padding mixed): gather the real tokens
            ids = torch.stack([input_ids[b, s : s + n] for b, (s, n) in enumerate(spans)])  # (B, L)
        return _last_logits(model, ids, cache)
    rows = [_last_logits(model, input_ids[b : b + 1, s : s + n], cache.row(b)) for b, (s, n) in enumerate(spans)]
    return torch.cat(rows)  # (B, V)


def decode_step(model, tok: torch.Tensor, cache) -> torch.Tensor:
    """One token per row (B,) through the model at each row's next position; the next-token logits (B, V)."""
    return model(tok[:, None], cache)[:, -1]


class _Decoder:
    """decode_step through a DecodeProgram (fastllm/models/_program.py: the step's kernel calls with prebuilt
    arguments, no Python in between) where one applies, else the model's forward. Checked every step: a step the
    program may not take now (fastllm.explain, another backend, grad mode) runs the forward; a weight changed
    since the build rebuilds it."""

    def __init__(self, model, cache):
        from fastllm.models._program import DecodeProgram

        self.build = DecodeProgram.build
        self.program = self.build(model, cache)

    def __call__(self, model, tok: torch.Tensor, cache) -> torch.Tensor:
        p = self.program
        if p is not None and not p.allowed():
            return decode_step(model, tok, cache)
        if p is not None and p.stale():
            p = self.program = self.build(model, cache)
        return decode_step(model, tok, cache) if p is None else p(tok)


def _last_logits(model, ids, cache) -> torch.Tensor:
    """The logits (B, V) after the last token of ids (B, L). A model whose forward takes last_only computes the
    lm_head on the last position only (at L = 32 the vocabulary projection would be 32x the work)."""
    if _takes_last_only(type(model)):
        return model(ids, cache, last_only=True)[:, -1]
    return model(ids, cache)[:, -1]


@functools.cache
def _takes_last_only(cls) -> bool:
    return "last_only" in inspect.signature(cls.forward).parameters


@functools.cache
def _compiled_step():
    """torch.compile of decode_step (one wrapper: dynamo keeps the graphs on decode_step's code, guarded per model)."""
    return torch.compile(decode_step)


# --------------------------------------------------------------------------------------------------
# sampling (HF semantics: TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in that order)


def sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,) int64: argmax, or a draw from softmax(warp(logits))."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = warp(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k=None, top_p=None) -> torch.Tensor:
    """float32 scores (B, V): logits / temperature, then -inf outside the top_k, then outside the top_p nucleus."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]  # (B, 1); ties with the k-th are kept, as HF
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # drop the least likely tokens whose total probability is at most 1 - top_p (the most likely always stays)
        sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


# --------------------------------------------------------------------------------------------------
# validation: once, before anything runs, naming the argument


def _max_positions(model) -> int | None:
    c = model.config
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        v = getattr(c, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _check_int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"generate: {name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"generate: {name} must be >= {lo}, got {v}")


def _check_prompt(model, input_ids, attention_mask, max_new_tokens) -> list:
    """Validate the prompt; per row (start, length) of its real tokens."""
    if not hasattr(model, "new_cache") or not hasattr(model, "config"):
        raise TypeError(f"generate: model must be a fastllm.models model (Llama, GPT2), got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"generate: input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2:
        raise ValueError(f"generate: input_ids must be a 2-D int64/int32 tensor (B, S), got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")  # fmt: skip
    B, S = input_ids.shape
    if B == 0 or S == 0:
        raise ValueError(f"generate: input_ids is an empty prompt: shape {tuple(input_ids.shape)}")
    V = model.config.vocab_size
    lo, hi = (int(t) for t in input_ids.aminmax())
    if lo < 0 or hi >= V:
        raise ValueError(f"generate: input_ids must lie in [0, {V}) (the vocabulary), got values in [{lo}, {hi}]")
    _check_int("max_new_tokens", max_new_tokens, 1)
    limit = _max_positions(model)
    if limit is not None and S + max_new_tokens > limit:
        raise ValueError(f"generate: the prompt ({S} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's limit ({limit} positions)")  # fmt: skip
    if attention_mask is None:
        return [(0, S)] * B
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"generate: attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}: they must agree")  # fmt: skip
    if attention_mask.device != input_ids.device:
        raise ValueError(f"generate: attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
    mask = attention_mask != 0
    if not torch.equal(mask, attention_mask == 1):
        raise ValueError("generate: attention_mask must hold only 0 (padding) and 1 (real tokens)")
    lengths = mask.sum(dim=1)  # (B,)
    if int(lengths.min()) == 0:
        b = int((lengths == 0).nonzero()[0])
        raise ValueError(f"generate: attention_mask row {b} has no token marked 1 (an empty prompt)")
    starts = mask.int().argmax(dim=1)  # (B,) the first real token
    pos = torch.arange(S, device=mask.device)
    contiguous = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])  # (B, S)
    if not torch.equal(mask, contiguous):
        b = int((mask != contiguous).any(dim=1).nonzero()[0])
        raise ValueError(f"generate: attention_mask row {b} has holes: the real tokens of a row must be contiguous "
                         "(left or right padding only)")  # fmt: skip
    return list(zip(starts.tolist(), lengths.tolist(), strict=True))


def _check_sampling(do_sample, temperature, top_k, top_p, generator) -> tuple:
    if not isinstance(do_sample, bool):
        raise TypeError(f"generate: do_sample must be a bool, got {type(do_sample).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"generate: temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"generate: temperature must be a positive finite number, got {temperature}")
    if top_k is not None:
        _check_int("top_k", top_k, 0)  # 0: no top-k (HF)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"generate: top_p must be a float or None, got {type(top_p).__name__}")
        if not 0 < top_p <= 1:
            raise ValueError(f"generate: top_p must lie in (0, 1], got {top_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generate: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return do_sample, float(temperature), top_k, top_p, generator


def _check_eos(model, eos_token_id, pad_token_id) -> tuple[list, int | None]:
    V = model.config.vocab_size
    if eos_token_id is None:
        eos = []
    elif isinstance(eos_token_id, (list, tuple)):
        eos = list(eos_token_id)
    else:
        eos = [eos_token_id]
    for name, ids in (("eos_token_id", eos), ("pad_token_id", [] if pad_token_id is None else [pad_token_id])):
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"generate: {name} must be an int (or a list of ints for eos), got {t!r}")
            if not 0 <= t < V:
                raise ValueError(f"generate: {name} {t} is outside the vocabulary [0, {V})")
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    return eos, pad
