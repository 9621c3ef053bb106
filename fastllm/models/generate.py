"""generate() for the zoo's decoders: a static preallocated KV cache, prefill with flash_attention, one
decode_attention step per token. The signature is a subset of Hugging Face's `generate`.

Ragged batches: attention_mask (B, S) marks the real tokens (left or right padding, real tokens contiguous).
Each row's cache holds only its real tokens (rows of different lengths are prefilled one by one), so padding is
never attended; the output keeps the prompt as given and appends the new tokens, as HF does.
"""

import torch

from fastllm.models.llama import check_ids


def _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p):
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"generate: input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    check_ids(model, input_ids[:, : model.config.max_seq_len], None)  # dtype, rank, empty, ids in the vocabulary
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"generate: temperature must be > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must lie in (0, 1] or be None, got {top_p!r}")
    B, S = input_ids.shape
    if attention_mask is None:
        lengths, starts = [S] * B, [0] * B
    else:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"generate: attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}")
        m = attention_mask.to(torch.bool)
        lengths = m.sum(1).tolist()
        starts = m.int().argmax(1).tolist()
        for b in range(B):
            if lengths[b] == 0:
                raise ValueError(f"generate: row {b} of attention_mask has no token (an empty prompt)")
            if not bool(m[b, starts[b] : starts[b] + lengths[b]].all()):
                raise ValueError(f"generate: row {b} of attention_mask is not one contiguous run of real tokens")
    total = max(lengths) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"generate: prompt ({max(lengths)}) + max_new_tokens ({max_new_tokens}) = {total} tokens "
                         f"exceeds the model's limit ({model.config.max_seq_len})")  # fmt: skip
    return input_ids, lengths, starts


def _sample(logits, do_sample, temperature, top_k, top_p, generator):
    """logits (B, V) -> next tokens (B,). HF's order: temperature, top_k, top_p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate_stream(model, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool = False,
                    temperature: float = 1.0, top_k=None, top_p=None, eos_token_id=None, pad_token_id=None,
                    generator=None, compile: bool = False):  # fmt: skip
    """Yield the next tokens (B,) LongTensor, one step at a time (finished rows yield pad_token_id)."""
    input_ids, lengths, starts = _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    B = input_ids.shape[0]
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    if max_new_tokens == 0:
        return
    # (inference_mode around each forward, not around the yields: a suspended generator must not leave the mode
    # switched on in the caller's code)
    with torch.inference_mode():
        cache = model.new_cache(B, max(lengths) + max_new_tokens)
        ids = input_ids.to(torch.int64)
        if len(set(lengths)) == 1 and len(set(starts)) == 1:  # one batched prefill
            s0 = starts[0]
            logits = model(ids[:, s0 : s0 + lengths[0]], cache, last_only=True)[:, -1]
        else:  # ragged: each row's real tokens alone, into its own cache row
            logits = torch.cat([model(ids[b : b + 1, starts[b] : starts[b] + lengths[b]], cache.row(b),
                                      last_only=True)[:, -1] for b in range(B)])  # fmt: skip
    step = torch.compile(model, dynamic=False) if compile else model
    done = torch.zeros(B, dtype=torch.bool)
    eos_t = torch.tensor(sorted(eos), dtype=torch.int64)
    for i in range(max_new_tokens):
        with torch.inference_mode():
            nxt = _sample(logits, do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        yield nxt.clone()  # (a normal tensor for the caller)
        if eos:
            done |= torch.isin(nxt, eos_t)
            if bool(done.all()):
                return
        if i + 1 < max_new_tokens:
            with torch.inference_mode():
                logits = step(nxt[:, None], cache, last_only=True)[:, -1]


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k=None, top_p=None, eos_token_id=None, pad_token_id=None,
             generator=None, compile: bool = False) -> torch.Tensor:  # fmt: skip
    """The prompt as given (B, S) followed by the new tokens: (B, S + n) int64, n <= max_new_tokens (fewer when
    every row has emitted eos_token_id; finished rows are filled with pad_token_id, default eos)."""
    steps = list(generate_stream(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                                 top_p, eos_token_id, pad_token_id, generator, compile))  # fmt: skip
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if not steps:
        return ids.to(torch.int64).clone()
    return torch.cat([ids.to(torch.int64), torch.stack(steps, 1)], 1)
