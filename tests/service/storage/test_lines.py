"""Splitting a stream into lines as its chunks arrive (:func:`iter_chunk_lines`, used for
upstream files and storage objects): however the chunks cut the stream, the lines come back
whole, byte for byte."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from service.storage import iter_chunk_lines


def cut(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """``data`` in chunks of the next of ``sizes`` bytes (cycling), as reads return it."""
    at, k = 0, 0
    while at < len(data):
        size = sizes[k % len(sizes)]
        yield data[at : at + size]
        at, k = at + size, k + 1


lines = st.lists(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")), max_size=30
)


@settings(max_examples=300, deadline=None)
@given(
    lines=lines,
    sizes=st.lists(st.integers(1, 200), min_size=1, max_size=8),
    crlf=st.booleans(),
    last_newline=st.booleans(),
)
def test_lines_come_back_whole_however_the_chunks_cut_them(
    lines: list[bytes], sizes: list[int], crlf: bool, last_newline: bool
) -> None:
    end = b"\r\n" if crlf else b"\n"
    data = end.join(lines) + (end if lines and last_newline else b"")
    got = list(iter_chunk_lines(cut(data, sizes)))
    # An empty last line without its terminator is no line at all.
    assert got == (lines if last_newline or (lines and lines[-1]) else lines[:-1])
    assert got == list(iter_chunk_lines([data]))  # as the whole stream in one chunk has it


def test_a_line_longer_than_many_chunks_comes_back_whole() -> None:
    long = b"x" * 5000
    data = b"a\n" + long + b"\nb\n" + b"c" * 100 + b"\n"
    assert list(iter_chunk_lines(cut(data, [7, 300]))) == [b"a", long, b"b", b"c" * 100]


def test_an_empty_stream_has_no_lines() -> None:
    assert list(iter_chunk_lines(iter([]))) == []
