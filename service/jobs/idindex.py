"""Which item first used each id of a job, in a few bytes an id.

Intake checks that a job's item ids are unique and names the item that used an id first. A dict
of 100,000 id strings costs about 120 bytes an id (the string object, the index as an int, the
dict's slots): more than half of a short item's JSON, at the moment the API holds the most. An
:class:`IdIndex` keeps the ids' text in one buffer and finds them through an open-addressing table
of positions (two machine words an id, at most half full), about 40 bytes an id.

Failure semantics: none; any string is an id here (intake checks their shape before).
"""

from __future__ import annotations

from array import array


class IdIndex:
    """A set of ids, each with the index of the item that used it first."""

    __slots__ = ("_ends", "_firsts", "_mask", "_table", "_text")

    def __init__(self, expected: int = 0) -> None:
        size = 8
        while size < 2 * expected:
            size *= 2
        self._text = bytearray()  # every id, one after another
        self._ends: array[int] = array("Q")  # where each id ends in _text
        self._firsts: array[int] = array("q")  # the item index that used each id first
        self._table: array[int] = array("q", [-1]) * size  # id number per slot, -1 = empty
        self._mask = size - 1

    def __len__(self) -> int:
        return len(self._ends)

    def first(self, item_id: str, index: int) -> int:
        """The index of the item that used ``item_id`` first: ``index`` when it is new (and
        from now on it is taken)."""
        key = item_id.encode()
        slot = self._find(key, hash(key))
        number = self._table[slot]
        if number >= 0:
            return self._firsts[number]
        self._table[slot] = len(self._ends)
        self._text += key
        self._ends.append(len(self._text))
        self._firsts.append(index)
        if 2 * len(self._ends) > len(self._table):
            self._grow()
        return index

    def _id(self, number: int) -> bytearray:
        start = self._ends[number - 1] if number else 0
        return self._text[start : self._ends[number]]

    def _find(self, key: bytes, hashed: int) -> int:
        """The slot holding ``key``, or the empty slot where it goes (linear probing)."""
        table, mask = self._table, self._mask
        slot = hashed & mask
        while (number := table[slot]) >= 0 and self._id(number) != key:
            slot = (slot + 1) & mask
        return slot

    def _grow(self) -> None:
        table = self._table = array("q", [-1]) * (2 * len(self._table))
        mask = self._mask = len(table) - 1
        for number in range(len(self._ends)):
            slot = hash(bytes(self._id(number))) & mask
            while table[slot] >= 0:
                slot = (slot + 1) & mask
            table[slot] = number
