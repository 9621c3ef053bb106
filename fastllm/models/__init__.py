"""The model zoo on fastllm ops: one readable file per family, loading from Hugging Face, and generate().

model = fastllm.models.from_pretrained("path/to/hf_dir")        # or from_hf(transformers_model)
tokens = model.generate(input_ids, max_new_tokens=64)

Families (by config.json's model_type): llama, mistral, qwen2 (fastllm.models.llama; SmolLM checkpoints are
llama) and gpt2 (fastllm.models.gpt2); the encoders bert, vit and clip (fastllm.models.bert / vit / clip; timm and
open_clip state dicts load through vit.from_timm and clip.from_open_clip).
"""

from fastllm.models._loading import from_hf, from_pretrained, save_pretrained
from fastllm.models.bert import Bert, BertConfig
from fastllm.models.clip import CLIP, CLIPConfig
from fastllm.models.generate import generate, generate_stream
from fastllm.models.gpt2 import GPT2, GPT2Config
from fastllm.models.llama import Llama, LlamaConfig
from fastllm.models.vit import ViT, ViTConfig
from fastllm.nn.kv_cache import KVCache

__all__ = ["CLIP", "GPT2", "Bert", "BertConfig", "CLIPConfig", "GPT2Config", "KVCache", "Llama", "LlamaConfig", "ViT",
           "ViTConfig", "from_hf", "from_pretrained", "generate", "generate_stream", "save_pretrained"]  # fmt: skip
