"""`overlay-node`: the command line, one subcommand per job.

This module is the composition root of the command line: the overlay's own subcommands are
imported directly; the ones that live in other packages (serving blocks, generating, the demo)
are named here as strings and imported only when invoked, so `overlay-node join` never loads
torch and the overlay package keeps no import dependency on the others.
"""

from __future__ import annotations

import sys

try:
    import argparse
    import importlib

    from overlay.cli import lifeline, node
except KeyboardInterrupt:  # Ctrl-C while the command is still starting: no traceback
    print("overlay-node: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

# Subcommands provided by other packages: name -> ("module:function that adds the parser",
# the one-line help that `overlay-node --help` lists without importing the module; a test
# checks it is the module's own).
_PLUGINS = {
    "dht": ("overlay.cli.dht:add_parser", "store or read a value in the DHT"),
    "serve": ("blocks.cli:add_parser", "serve a span of a model's blocks"),
    "generate": ("client.cli:add_generate_parser", "generate text through the swarm"),
    "status": ("client.cli:add_status_parser", "the swarm: models, servers, spans, coverage"),
    "demo": ("client.demo:add_parser", "run a local swarm and generate through it"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlay-node",
        description="Run large language models collaboratively over an encrypted overlay.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v debug); -q for warnings only")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    node.add_parsers(sub)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (target, summary) in _PLUGINS.items():
        if wanted != name:
            # Listed in --help without importing their packages.
            sub.add_parser(name, help=summary, add_help=False)
            continue
        module_name, _, function = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # not built yet in this version
            raise
        getattr(module, function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        from overlay.runtime import SERVICES, run, setup_logging

        argv = sys.argv[1:] if argv is None else argv
        parser = build_parser(argv)  # imports the subcommand's package: torch for some
        args = parser.parse_args(argv)
        setup_logging(-1 if args.quiet else args.verbose)
        if getattr(args, "lifeline_fd", None) is not None:  # join and serve
            lifeline.watch(args.lifeline_fd)
        if not hasattr(args, "func"):
            parser.error(f"{args.command} is not available in this version")
        # Heavy imports (torch, transformers: seconds) happen here, where Ctrl-C is a plain
        # KeyboardInterrupt: inside `run` the loop's signal handler would wait for them to end.
        for module_name in getattr(args, "preload", ()):
            importlib.import_module(module_name)
        return run(args.func(args), stopping_is_success=args.command in SERVICES)
    except KeyboardInterrupt:  # before `run` handles signals itself (importing torch, ...)
        print("overlay-node: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
