"""Sans-IO NBD: wire structures and state machines, with no trio and no sockets.

Installed as ``nbdverify_protocol`` (the source directory is ``protocol/``).
"""

from .native import activate as _activate

_activate(__name__, __path__, __file__)
