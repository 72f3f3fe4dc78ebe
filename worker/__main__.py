"""`python -m worker ...`: the bridge, the HTTP API, the settings, the tiny models and the demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from worker.settings import get_settings


def _config(_: argparse.Namespace) -> None:
    table = Table("setting", "environment variable", "value", title="effective settings")
    for name, value in get_settings().masked().items():
        table.add_row(name, name.upper(), value)
    Console().print(table)


def _bridge(_: argparse.Namespace) -> None:
    from tasks.chain import SENDER
    from worker.flow.bridge import main

    main(SENDER)


def _api(_: argparse.Namespace) -> None:
    from worker.api import main

    main()


def _make_tiny(args: argparse.Namespace) -> None:
    if args.qwen:
        from worker.local.tiny_qwen import NOISE_WARNING as QWEN_WARNING
        from worker.local.tiny_qwen import make_tiny_qwen

        print(f"tiny Qwen model saved to {make_tiny_qwen(args.dir)}: {QWEN_WARNING}")
        return
    from worker.local.tiny_models import NOISE_WARNING, make_tiny_vace, make_tiny_wan

    path = (make_tiny_vace if args.vace else make_tiny_wan)(args.dir)
    kind = "VACE" if args.vace else "WAN"
    print(f"tiny {kind} pipeline saved to {path}: {NOISE_WARNING}")


def _demo(args: argparse.Namespace) -> None:
    from worker.local.demo import run_demo

    sys.exit(run_demo(full=args.full))


def main(argv: list[str] | None = None) -> None:
    from worker.observe import logs

    logs.configure(get_settings())
    parser = argparse.ArgumentParser(prog="python -m worker")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    commands.add_parser("config", help="print the effective settings, secrets masked").set_defaults(
        run=_config
    )
    commands.add_parser("bridge", help="move platform jobs into Celery").set_defaults(run=_bridge)
    commands.add_parser("api", help="serve the HTTP API on API_HOST:API_PORT").set_defaults(
        run=_api
    )
    models = commands.add_parser("models", help="model tools").add_subparsers(required=True)
    tiny = models.add_parser("make-tiny", help="build a tiny random-weight model offline")
    tiny.add_argument("dir", type=Path)
    kind = tiny.add_mutually_exclusive_group()
    kind.add_argument(
        "--qwen", action="store_true", help="the tiny Qwen enhancement model instead of WAN"
    )
    kind.add_argument(
        "--vace", action="store_true", help="the VACE model (for WAN_VACE_MODEL_PATH) instead"
    )
    tiny.set_defaults(run=_make_tiny)
    demo = commands.add_parser("demo", help="run one job of each kind end to end, locally")
    demo.add_argument(
        "--full",
        action="store_true",
        help="use the job types' full defaults (81 frames, 25 steps) even on a CPU",
    )
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
