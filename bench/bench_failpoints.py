"""Failpoints when unset: what one ``failpoint("...")`` call costs next to a plain function call.

The service calls a failpoint at every state transition (a few per item at most), so unset it
must cost about what any empty function call costs. Measured side by side in one run, each
timing the best of several repeats of a million calls: an empty function, ``failpoint()`` with
nothing armed, and (for scale) ``failpoint()`` of a name that is not armed while another is.
Target (issue 15): inert and nearly free when unset — within 2x of an empty call, a few tens of
nanoseconds.
"""

from __future__ import annotations

import sys
import timeit

from _support import ROOT, machine

sys.path.insert(0, str(ROOT))

from service.failpoints import arm, failpoint

CALLS = 1_000_000
REPEATS = 7


def plain(name: str) -> None:
    """The baseline: a function of one argument that does nothing."""


def best_ns(stmt: str) -> float:
    timer = timeit.Timer(stmt, globals={"failpoint": failpoint, "plain": plain})
    return min(timer.repeat(REPEATS, CALLS)) / CALLS * 1e9


def main() -> None:
    print(f"machine: {machine()}")
    arm("", None)
    empty_loop = best_ns("pass")
    base = best_ns('plain("collect.line")') - empty_loop
    unset = best_ns('failpoint("collect.line")') - empty_loop
    arm("sweep.pass=raise", None)  # another failpoint armed, not this one
    other = best_ns('failpoint("collect.line")') - empty_loop
    arm("", None)
    print(f"plain function call:            {base:6.1f} ns per call")
    print(f"failpoint(), none armed:        {unset:6.1f} ns per call ({unset / base:.2f}x)")
    print(f"failpoint(), another one armed: {other:6.1f} ns per call ({other / base:.2f}x)")


if __name__ == "__main__":
    main()
