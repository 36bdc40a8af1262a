"""Numbers of the NBD protocol, named as in the spec (NetworkBlockDevice/nbd doc/proto.md)."""

from __future__ import annotations

import enum
import errno as host

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes the server sends
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle magic and prefix of every option
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
# Extended headers (NBD_OPT_EXTENDED_HEADERS, branch extension-ext-header of the spec):
# 32-byte requests and replies with 64-bit lengths.
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C

SECTOR_SIZE = 512
# Option payloads are small (names are at most 4096 bytes); larger ones are refused
# with NBD_REP_ERR_TOO_BIG after being skipped, never buffered.
MAX_OPTION_LENGTH = 64 * 1024
# The spec asks that strings be at most 4096 bytes; QEMU drops the connection on a
# structured error payload over 1000 bytes, so our messages stay far below both.
MAX_ERROR_MESSAGE = 256


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class OptionReplyType(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_PLATFORM = 2**31 + 4
    ERR_TLS_REQD = 2**31 + 5
    ERR_UNKNOWN = 2**31 + 6
    ERR_SHUTDOWN = 2**31 + 7
    ERR_BLOCK_SIZE_REQD = 2**31 + 8
    ERR_TOO_BIG = 2**31 + 9
    ERR_EXT_HEADER_REQD = 2**31 + 10


class InfoType(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    #: Extended headers only: `length` is the payload's (WRITE must set it).
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


# Chunk types with this bit set are errors, known or not.
ERROR_CHUNK_BIT = 2**15


class ChunkType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = 2**15 + 1
    ERROR_OFFSET = 2**15 + 2


class Errno(enum.IntEnum):
    """Error values on the wire; they are not the host's errno numbers."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108

    @classmethod
    def from_host(cls, host_errno: int) -> Errno:
        """The wire error for a host errno; the spec maps EDQUOT and EFBIG to ENOSPC,
        and anything without a wire value becomes EIO."""
        return _HOST_TO_WIRE.get(host_errno, cls.EIO)


_HOST_TO_WIRE = {
    host.EPERM: Errno.EPERM,
    host.EROFS: Errno.EPERM,
    host.EACCES: Errno.EPERM,
    host.EIO: Errno.EIO,
    host.ENOMEM: Errno.ENOMEM,
    host.EINVAL: Errno.EINVAL,
    host.ENOSPC: Errno.ENOSPC,
    host.EDQUOT: Errno.ENOSPC,
    host.EFBIG: Errno.ENOSPC,
    host.EOVERFLOW: Errno.EOVERFLOW,
    host.ENOTSUP: Errno.ENOTSUP,
    host.EOPNOTSUPP: Errno.ENOTSUP,
    host.ESHUTDOWN: Errno.ESHUTDOWN,
}


class AllocationState(enum.IntFlag):
    """Flags of the base:allocation metadata context."""

    DATA = 0
    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"

# Flags each command accepts; anything else is answered with EINVAL.
ALLOWED_COMMAND_FLAGS: dict[Command, CommandFlag] = {
    Command.READ: CommandFlag.FUA | CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA,
    Command.DISC: CommandFlag(0),
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.CACHE: CommandFlag(0),
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.FUA | CommandFlag.REQ_ONE,
}
