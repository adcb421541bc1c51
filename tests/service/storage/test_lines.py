"""Splitting a stream into lines from a reused buffer (:func:`iter_readinto_lines`): whatever
the reads return, the lines come back whole, byte for byte, and memory follows the longest line,
not the stream."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from service.storage import iter_chunk_lines, iter_readinto_lines


class Trickle:
    """A stream whose reads return at most the next of ``sizes`` bytes (cycling)."""

    def __init__(self, data: bytes, sizes: list[int]):
        self.stream, self.sizes, self.reads = io.BytesIO(data), sizes, 0

    def readinto(self, view: memoryview) -> int:
        size = self.sizes[self.reads % len(self.sizes)]
        self.reads += 1
        return self.stream.readinto(view[:size])


lines = st.lists(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")), max_size=30
)


@settings(max_examples=300, deadline=None)
@given(
    lines=lines,
    sizes=st.lists(st.integers(1, 200), min_size=1, max_size=8),
    buffer_bytes=st.integers(1, 64),
    crlf=st.booleans(),
    last_newline=st.booleans(),
)
def test_lines_come_back_whole_however_the_reads_cut_them(
    lines: list[bytes], sizes: list[int], buffer_bytes: int, crlf: bool, last_newline: bool
) -> None:
    end = b"\r\n" if crlf else b"\n"
    data = end.join(lines) + (end if lines and last_newline else b"")
    got = list(iter_readinto_lines(Trickle(data, sizes).readinto, buffer_bytes))
    # An empty last line without its terminator is no line at all.
    assert got == (lines if last_newline or (lines and lines[-1]) else lines[:-1])
    assert got == list(iter_chunk_lines([data]))  # as the chunked splitter has it


def test_a_line_longer_than_the_buffer_grows_it_and_nothing_else_does() -> None:
    long = b"x" * 5000
    data = b"a\n" + long + b"\nb\n" + b"c" * 100 + b"\n"
    assert list(iter_readinto_lines(Trickle(data, [7, 300]).readinto, 64)) == [
        b"a",
        long,
        b"b",
        b"c" * 100,
    ]


def test_an_empty_stream_has_no_lines() -> None:
    assert list(iter_readinto_lines(io.BytesIO(b"").readinto)) == []
