"""Which item first used each id of a job, in a few bytes an id.

Intake checks that a job's item ids are unique and names the item that used an id first. A dict
of 100,000 id strings costs about 120 bytes an id (the string object, the index as an int, the
dict's slots): more than a short item's whole JSON, at the moment the API holds the most. An
:class:`IdIndex` keeps the ids' text in one buffer and finds them through an open-addressing table
of positions (32-bit numbers, at most half full): about 20 bytes an id besides its text.

An item without an id has its index as its id (``"7"``). Those ids are not written down at all:
one bit an item says which items went without, and a given id that reads as a number is checked
against that bit, so a job of 100,000 items without ids costs 12.5 KB here.

Failure semantics: none; any string is an id here (intake checks their shape before).
"""

from __future__ import annotations

from array import array

# Table slots are 32-bit: no job holds two billion ids.
_EMPTY = -1


class IdIndex:
    """A set of ids, each with the index of the item that used it first."""

    __slots__ = ("_ends", "_firsts", "_implicit", "_mask", "_table", "_text")

    def __init__(self, expected: int = 0) -> None:
        self._text = bytearray()  # every given id, one after another
        self._ends: array[int] = array("I")  # where each given id ends in _text
        self._firsts: array[int] = array("i")  # the item index that used each given id first
        self._table: array[int] = array("i", [_EMPTY]) * 8  # id number per slot
        self._mask = 7
        # Bit i: item i has no id of its own (its id is its index); sized as items come.
        self._implicit = bytearray((expected + 7) // 8)

    def __len__(self) -> int:
        return len(self._ends)

    def first(self, item_id: str, index: int) -> int:
        """The index of the item that used ``item_id`` first: ``index`` when it is new (and
        from now on it is taken). Items are registered in order of their index."""
        key = item_id.encode()
        slot = self._find(key, hash(key))
        number = self._table[slot]
        if number != _EMPTY:
            return self._firsts[number]
        # An id that reads as a number may be an earlier item's index, which it took as its id.
        if key.isdigit() and (key == b"0" or key[0] != 0x30):
            other = int(key)
            if other < index and self._is_implicit(other):
                return other
        self._table[slot] = len(self._ends)
        self._text += key
        self._ends.append(len(self._text))
        self._firsts.append(index)
        if 2 * len(self._ends) > len(self._table):
            self._grow()
        return index

    def first_implicit(self, index: int) -> int:
        """:meth:`first` for an item without an id (its id is ``str(index)``), without writing
        the id down: an earlier item that gave it explicitly is the first."""
        key = str(index).encode()
        number = self._table[self._find(key, hash(key))]
        if number != _EMPTY:
            return self._firsts[number]
        byte = index >> 3
        if byte >= len(self._implicit):
            self._implicit += bytes(byte + 1 - len(self._implicit))
        self._implicit[byte] |= 1 << (index & 7)
        return index

    def _is_implicit(self, index: int) -> bool:
        byte = index >> 3
        return byte < len(self._implicit) and bool(self._implicit[byte] >> (index & 7) & 1)

    def _id(self, number: int) -> bytearray:
        start = self._ends[number - 1] if number else 0
        return self._text[start : self._ends[number]]

    def _find(self, key: bytes, hashed: int) -> int:
        """The slot holding ``key``, or the empty slot where it goes (linear probing)."""
        table, mask = self._table, self._mask
        slot = hashed & mask
        while (number := table[slot]) != _EMPTY and self._id(number) != key:
            slot = (slot + 1) & mask
        return slot

    def _grow(self) -> None:
        table = self._table = array("i", [_EMPTY]) * (2 * len(self._table))
        mask = self._mask = len(table) - 1
        for number in range(len(self._ends)):
            slot = hash(bytes(self._id(number))) & mask
            while table[slot] != _EMPTY:
                slot = (slot + 1) & mask
            table[slot] = number
