"""The model zoo on fastllm ops: one readable file per family, loading from Hugging Face, and generate().

model = fastllm.models.from_pretrained("path/to/hf_dir")        # or from_hf(transformers_model)
tokens = model.generate(input_ids, max_new_tokens=64)

Families (by config.json's model_type): llama, mistral, qwen2 (fastllm.models.llama; SmolLM checkpoints are
llama) and gpt2 (fastllm.models.gpt2).
"""

from fastllm.models._loading import from_hf, from_pretrained, save_pretrained
from fastllm.models.generate import generate, generate_stream
from fastllm.models.gpt2 import GPT2, GPT2Config
from fastllm.models.llama import Llama, LlamaConfig
from fastllm.nn.kv_cache import KVCache

__all__ = ["GPT2", "GPT2Config", "KVCache", "Llama", "LlamaConfig", "from_hf", "from_pretrained", "generate",
           "generate_stream", "save_pretrained"]  # fmt: skip
