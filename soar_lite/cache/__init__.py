"""The cache stage (a package: this step only moves ``cache.py`` to ``cache/order.py``)."""

from soar_lite.cache.order import *  # noqa: F403
from soar_lite.cache.order import _referenced_keys  # noqa: F401
