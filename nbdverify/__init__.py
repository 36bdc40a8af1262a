"""nbdverify: an NBD server that exposes a verified block device.

Layers, each depending only on those before it: ``nbdverify_protocol`` (sans-IO
NBD) -> ``children``/``device`` (verification) -> ``server`` (trio I/O) -> ``cli``.
"""

__version__ = "0.1.0"

from nbdverify_protocol.native import activate as _activate

_activate(__name__, __path__, __file__)
