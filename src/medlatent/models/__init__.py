"""Networks (`nn.Module`s with a config and `save_pretrained` / `from_pretrained`), apart from the
estimators that train them: the classifier of every space, its timm backbones, the latent denoiser."""

from .backbones import BACKBONES, create_backbone
from .classifier import Classifier
from .denoiser import Denoiser

__all__ = ["BACKBONES", "Classifier", "Denoiser", "create_backbone"]
