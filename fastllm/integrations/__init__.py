"""Drop-in acceleration of existing models: fastllm.accelerate(model) / fastllm.restore(model).

engine.py: the engine, the report and the class swap; torch_nn.py: the torch.nn rules; hf.py: Hugging Face
transformers (the "fastllm" attention implementation and its rules).
"""

from fastllm.integrations import hf
from fastllm.integrations.engine import Report, Rule, accelerate, restore

hf.install()

__all__ = ["Report", "Rule", "accelerate", "restore"]
