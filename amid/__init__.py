"""amid: an offline teacher-logit cache and an AMiD knowledge-distillation trainer.

Public API: `LossConfig`, `full_loss`, `sparse_loss`, `log_alpha_mixture`, `open_cache`.
"""

from amid.losses import LossConfig, full_loss, sparse_loss
from amid.mixture import log_alpha_mixture

__version__ = "0.5.1"
__all__ = ["LossConfig", "full_loss", "sparse_loss", "log_alpha_mixture", "open_cache", "__version__"]


def __getattr__(name: str):
    # The cache pulls in pyarrow; import it only when asked for.
    if name == "open_cache":
        from amid.cache import open_cache

        return open_cache
    raise AttributeError(f"module 'amid' has no attribute {name!r}")
