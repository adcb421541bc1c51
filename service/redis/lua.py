"""The Lua scripts imagebatch runs in Redis, each in its own file under ``scripts/``.

A script is loaded from the package once per process and registered per client
(:func:`script`): redis-py sends ``EVALSHA`` and falls back to ``EVAL`` when the server does not
know the script yet (after a restart or a failover), so a script is never missing.

A line ``--! include NAME(ARG)`` pulls in ``scripts/NAME.lua`` with ``{arg}`` replaced by ARG:
the one clock prelude (``clock``) that every script reading the time shares.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import redis
from redis.commands.core import Script

SCRIPTS = Path(__file__).parent / "scripts"
_INCLUDE = re.compile(r"^--! include (\w+)\(([^)]*)\)$", re.MULTILINE)


@cache
def source(name: str) -> str:
    """The text of ``scripts/{name}.lua`` with its includes expanded."""
    text = (SCRIPTS / f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: source(m.group(1)).replace("{arg}", m.group(2)), text)


def script(client: redis.Redis, name: str) -> Script:
    """``scripts/{name}.lua`` registered on ``client`` (call it with ``keys=`` and ``args=``)."""
    return client.register_script(source(name))
