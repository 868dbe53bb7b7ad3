"""Deployment with Paddle Inference: export a converted checkpoint as a static program, and generate with it.

python -m paddle_glm4.inference export --model CHECKPOINT --out EXPORT [--dtype bfloat16] [--max-seq-len N]
Predictor(EXPORT, device="cpu", precision="float32").generate(ids, max_new_tokens=32)
"""

from .export import export_model
from .manifest import ExportError
from .predictor import Predictor

__all__ = ["ExportError", "Predictor", "export_model"]
