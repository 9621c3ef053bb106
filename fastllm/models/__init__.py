"""The model zoo on fastllm ops: one readable file per family, loading from Hugging Face, and generate().

model = fastllm.models.from_pretrained("path/to/hf_dir")        # or from_hf(transformers_model)
tokens = model.generate(input_ids, max_new_tokens=64)
"""

from fastllm.models._loading import from_hf, from_pretrained, save_pretrained
from fastllm.models.generate import generate, generate_stream
from fastllm.models.llama import Llama, LlamaConfig
from fastllm.nn.kv_cache import KVCache

__all__ = ["KVCache", "Llama", "LlamaConfig", "from_hf", "from_pretrained", "generate", "generate_stream",
           "save_pretrained"]  # fmt: skip
