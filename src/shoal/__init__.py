"""shoal: Ray Serve's programming model, faster and lighter.

`from shoal import serve` mirrors `from ray import serve`; the same names are also available here.
"""

from shoal import serve
from shoal.serve import *  # noqa: F401,F403
from shoal.serve import __all__ as _serve_all

__version__ = "0.1.0"
__all__ = ["serve", *_serve_all]
