"""Where a text file goes wrong: the line of a byte offset, and the first bytes that are not UTF-8.

Readers decode a file in large chunks (io.TextIOWrapper reads ahead), so a UnicodeDecodeError
raised while a reader parses line N may come from a byte many lines further on. These helpers
rescan the bytes to name the line that holds it. A line ends at "\\n", "\\r\\n" or a lone "\\r",
as Python's universal newlines (and the csv module reading a file opened with newline="") count
lines.
"""

from __future__ import annotations

import codecs
import os

_CHUNK = 1 << 20


def count_line_breaks(data: bytes) -> int:
  """The number of line ends ("\\n", "\\r\\n" or a lone "\\r") in `data`."""
  return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def line_of_offset(path: str | os.PathLike, offset: int) -> int:
  """The 1-based line of `path` that holds the byte at `offset` (read in chunks, any size)."""
  breaks, previous_cr = 0, False
  with open(path, "rb") as f:
    while offset > 0:
      chunk = f.read(min(_CHUNK, offset))
      if not chunk:
        break
      # A "\r\n" cut between two chunks: the "\r" was counted as a line end already.
      breaks += count_line_breaks(chunk) - (previous_cr and chunk[:1] == b"\n")
      previous_cr = chunk[-1:] == b"\r"
      offset -= len(chunk)
  return breaks + 1


def first_utf8_error(path: str | os.PathLike) -> tuple[int, str] | None:
  """(byte offset, reason) of the first bytes of `path` that are not UTF-8, or None if all are."""
  decoder = codecs.getincrementaldecoder("utf-8")()
  offset = 0
  with open(path, "rb") as f:
    while True:
      chunk = f.read(_CHUNK)
      try:
        decoder.decode(chunk, final=not chunk)
      except UnicodeDecodeError as e:
        buffered = len(e.object) - len(chunk)  # A character's first bytes kept from the last chunk.
        return offset - buffered + e.start, e.reason
      if not chunk:
        return None
      offset += len(chunk)


def utf8_error(path: str | os.PathLike) -> tuple[int, str]:
  """(line, message) naming the first bytes of `path` that are not UTF-8: for the error of a
  reader whose decoding failed (the message says where and that the file may be binary)."""
  found = first_utf8_error(path)
  if found is None:  # The file changed since the reader failed.
    return 1, "not valid UTF-8 text"
  offset, reason = found
  return (line_of_offset(path, offset),
          f"not valid UTF-8 at byte offset {offset} ({reason}); is it a binary file?")
