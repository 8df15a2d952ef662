"""tokenopt: token reduction for Vision Transformers as torch.fx graph rewrites.

    >>> import torch, timm, tokenopt
    >>> gm = tokenopt.optimize(timm.create_model("deit_tiny_patch16_224", depth=2), policy="none")
    >>> gm(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 1000])

Importing tokenopt imports neither triton nor CUDA; the Triton kernels load on first use.
"""

from tokenopt._version import __version__
from tokenopt.api import optimize
from tokenopt.calibrate import Calibration, calibrate
from tokenopt.capture import CaptureError, capture
from tokenopt.explain import explain, gate_usage, token_counts
from tokenopt.ir import BlockInfo, ModelInfo
from tokenopt.module import OptimizedModule
from tokenopt.passes import BlockStructureError, NoAttentionError, find_blocks, get_model_info
from tokenopt.pipeline import PassError, Pipeline, register_pass
from tokenopt.policies import AdaViT, ATS, AViT, DynamicViT, NoReduction, PiToMe, PolicyConfig, SaiT, ToMe, TopK
from tokenopt.saving import LoadError, export_onnx, load, save
from tokenopt.training import TrainingModule, prepare_training

__all__ = [
    "__version__", "optimize", "calibrate", "Calibration", "prepare_training", "TrainingModule", "save", "load", "export_onnx", "LoadError", "OptimizedModule", "capture", "explain", "token_counts", "gate_usage", "find_blocks", "get_model_info",
    "CaptureError", "NoAttentionError", "BlockStructureError", "PassError",
    "BlockInfo", "ModelInfo", "Pipeline", "register_pass", "PolicyConfig", "NoReduction", "AdaViT", "ATS", "AViT", "DynamicViT", "PiToMe", "SaiT", "TopK", "ToMe",
]
