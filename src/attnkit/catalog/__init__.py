"""attnkit.catalog: every named variant (``attnkit list``), with the inputs, costs and forms ``check`` and ``bench``
use. Importing the package registers the families in a fixed order: softmax, differential, multi-token,
2-simplicial, linear."""
from . import softmax, differential, multitoken, simplicial, linear  # noqa: F401,I001  (registration order)
from .registry import PATTERNS, Spec, Variant, aliases, get_variant, register, variants

__all__ = ["Spec", "Variant", "register", "variants", "get_variant", "aliases", "PATTERNS"]
