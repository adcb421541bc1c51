"""The ``imagebatch`` command.

``imagebatch up`` runs the whole stack on embedded defaults (a Redis of its own, the simulator
when ``OPENAI_API_KEY`` is unset, local storage, the API, workers and beat) and stops it all on
Ctrl-C or SIGTERM. ``api``, ``worker``, ``beat`` and ``simulator`` run one process each, as a
deployment does. ``submit``, ``status``, ``download``, ``retry`` and ``schedules`` talk to a running API.
``failpoints`` lists the failpoints a drill can arm (``IMAGEBATCH_FAILPOINTS``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from service.cli import client, processes, stack


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if argv[:1] == ["simulator"]:
        raise SystemExit(processes.cmd_simulator(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="imagebatch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "up",
        help="run the whole stack on embedded defaults",
        description="Run the whole stack on embedded defaults: a Redis of its own, the simulator "
        "when OPENAI_API_KEY is unset, local storage, the API, workers and beat. Ctrl-C stops it "
        "all; the next `up` finds the jobs this one left.",
    )
    p.add_argument(
        "--data-dir",
        help="where Redis, the simulator and local storage keep their data (default .imagebatch)",
    )
    p.add_argument("--api-port", type=int, help="the API's port (default 8000)")
    p.add_argument("--simulator-port", type=int, help="the simulator's port (default 8100)")
    processes.add_commands(sub)
    client.add_commands(sub)
    args = parser.parse_args(argv)
    handlers = {
        "up": stack.cmd_up,
        "api": processes.cmd_api,
        "worker": processes.cmd_worker,
        "beat": processes.cmd_beat,
        "failpoints": processes.cmd_failpoints,
    }
    if args.command in handlers:
        raise SystemExit(handlers[args.command](args))
    raise SystemExit(client.run(args))


if __name__ == "__main__":
    main()
