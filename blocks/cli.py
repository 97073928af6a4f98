"""`overlay-node serve MODEL_DIR`: load a span of blocks and serve it on the overlay."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time

from blocks import serve_placement
from blocks.protocol import DEFAULT_MAX_BACKWARD_TOKENS, DEFAULT_MAX_REQUEST_TOKENS
from overlay.cli import lifeline
from overlay.cli.node import positive_int

log = logging.getLogger("blocks.serve")


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="serve a span of a model's blocks",
        description="Load blocks of a local Hugging Face model directory and serve them. Prints "
                    "the server's full multiaddr as the first line of standard output once it "
                    "is serving and announced.",
    )
    serve.add_argument("model_dir", metavar="MODEL_DIR")
    which = serve.add_mutually_exclusive_group()
    which.add_argument("--blocks", metavar="A:B",
                       help="serve blocks A (inclusive) to B (exclusive)")
    which.add_argument("--num-blocks", type=_num_blocks, metavar="N|auto",
                       help="serve N blocks (auto: as many as fit in free memory: weights + "
                            "--cache-tokens + autograd reserve) chosen from what the DHT says, "
                            "and move when the "
                            "swarm is imbalanced (default: all blocks)")
    serve.add_argument("--bootstrap", action="append", default=[], metavar="MADDR",
                       help="a node of the swarm's DHT (repeatable)")
    serve.add_argument("--listen", default="/ip4/0.0.0.0/tcp/0", metavar="MADDR")
    serve.add_argument("--announce-addr", action="append", default=[], metavar="MADDR",
                       help="announce this address for clients to dial instead of the listen "
                            "address (repeatable): a public address or forwarded port behind "
                            "NAT. Default: the listen address, a wildcard host replaced by "
                            "this machine's address on its default route")
    serve.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    serve.add_argument("--dtype", default="auto",
                       choices=["auto", "float32", "float16", "bfloat16"])
    serve.add_argument("--quant", default="none", choices=["none", "int8", "nf4"],
                       help="the blocks' linear weights through bitsandbytes: int8 (LLM.int8(), "
                            "outlier threshold 6.0) or nf4 (QLoRA, double quantization)")
    serve.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                       help="dummy: random weights from config.json alone, for benchmarks")
    serve.add_argument("--decode", default="auto", choices=["auto", "compiled", "fast", "plain"],
                       help="single-token steps: auto (default: compiled on CUDA, fast "
                            "elsewhere), compiled (the static-cache step compiled by "
                            "torch.compile at load, about 35 s for an 8B span on a GPU and "
                            "15-35 s for a small span on a CPU, which needs a C++ compiler; "
                            "checked against a float32 run; on CUDA then replayed as CUDA "
                            "graphs; where it fails, fast), fast (direct layer calls, static "
                            "caches and CUDA graphs of the eager step, checked equal) or plain")
    serve.add_argument("--model-id", help="swarm-wide name of the model (default: derived from "
                                          "the directory name and its config)")
    serve.add_argument("--cache-tokens", type=positive_int, default=8192,
                       help="attention-cache capacity in tokens per block (default 8192)")
    serve.add_argument("--max-length", type=positive_int, default=8192,
                       help="longest session a client may open (default 8192)")
    serve.add_argument("--max-request-tokens", type=positive_int,
                       default=DEFAULT_MAX_REQUEST_TOKENS, metavar="N",
                       help="most tokens (batch x length) of one forward or inference step; "
                            "announced, and clients split longer ones to fit (default "
                            f"{DEFAULT_MAX_REQUEST_TOKENS})")
    serve.add_argument("--max-backward-tokens", type=positive_int,
                       default=DEFAULT_MAX_BACKWARD_TOKENS, metavar="N",
                       help="most tokens (batch x length) of one backward (fine-tuning); "
                            "announced, and clients split larger ones to fit (default "
                            f"{DEFAULT_MAX_BACKWARD_TOKENS})")
    serve.add_argument("--announce-period", type=serve_placement.positive, default=60.0,
                       metavar="SECONDS",
                       help="how often to refresh the DHT announcement; records expire after "
                            "twice that (default 60, as in Petals)")
    serve.add_argument("--identity", metavar="PATH",
                       help="Ed25519 identity file, created when missing (default: a fresh key)")
    serve_placement.add_arguments(serve)
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                       help="host a PEFT LoRA adapter under NAME for clients to choose "
                            "(repeatable); only the tensors of the served blocks are read")
    lifeline.add_argument(serve)
    # imported before the event loop runs (overlay/cli/main.py): Ctrl-C then stops it at once
    serve.set_defaults(func=run_serve, preload=("blocks.server", "blocks.span", "blocks.announcer"))


def _num_blocks(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def parse_blocks(text: str | None, num_blocks: int | None, total: int
                 ) -> tuple[int, int] | int:
    """A fixed span (`--blocks A:B`, or all blocks by default), or with `--num-blocks N` the
    number of blocks to place by the DHT."""
    if text is not None:
        try:
            start_text, end_text = text.split(":")
            start, end = int(start_text), int(end_text)
        except ValueError:
            raise SystemExit(
                f"overlay-node serve: --blocks must look like A:B, got {text!r}") from None
        if not 0 <= start < end <= total:
            raise SystemExit(f"overlay-node serve: blocks {start}:{end} are not a non-empty range "
                             f"of the model's {total} blocks")
        return start, end
    if num_blocks is None:
        return 0, total
    if not 0 < num_blocks <= total:
        raise SystemExit(f"overlay-node serve: --num-blocks must be in 1..{total}")
    return num_blocks


async def run_serve(args: argparse.Namespace) -> int:
    from blocks.announcer import Announcer
    from blocks.footprint import choose_num_blocks
    from blocks.lora import AdapterError, check_adapter_specs
    from blocks.next_hop_pinger import NextHopPinger
    from blocks.server import BlockServer, ServingConfig
    from blocks.span import BlockSpan
    from model_parts.dummy import open_model_files
    from model_parts.files import ModelFilesError, default_model_id
    from model_parts.skeleton import DeviceOptions, load_config, resolve_device, resolve_dtype
    from overlay.bandwidth_service import BandwidthTestService
    from overlay.cli.node import dialable, load_identity, parse_addrs
    from overlay.host import Host
    from overlay.multiaddr import MultiaddrError
    from overlay.runtime import in_daemon_thread
    from tensor_wire.blockwise import bitsandbytes_functional

    try:
        adapter_specs = check_adapter_specs(args.adapter)  # now: a typo costs no load
    except AdapterError as e:
        raise SystemExit(f"overlay-node serve: {e}") from None
    try:
        files = open_model_files(args.model_dir, args.load_format)
        config = load_config(files)
        device = resolve_device(args.device)
        dtype = resolve_dtype(files, args.dtype)
    except (ModelFilesError, ValueError, OSError) as e:
        raise SystemExit(f"overlay-node serve: {e}") from None
    text_config = config.get_text_config()
    total = text_config.num_hidden_layers
    if args.num_blocks == "auto":
        args.num_blocks = _auto_num_blocks(choose_num_blocks, config, device, dtype, args)
    wanted = parse_blocks(args.blocks, args.num_blocks, total)
    model_id = args.model_id or default_model_id(args.model_dir)
    bootstrap = parse_addrs(args.bootstrap)
    [listen] = parse_addrs([args.listen])
    options = DeviceOptions(device=args.device, dtype=args.dtype)

    def load(start: int, end: int) -> BlockSpan:
        began = time.perf_counter()
        log.info("loading blocks [%d, %d) of %s (%s) on %s", start, end, args.model_dir,
                 model_id, args.device)
        span = BlockSpan.load(files, start, end, options, decode=_decode_options(args.decode),
                              quant=args.quant)
        log.info("loaded %d blocks in %.1f s (quant %s; decode paths %s)", end - start,
                 time.perf_counter() - began, args.quant, span.decode_paths)
        return span

    async def load_or_exit(start: int, end: int) -> BlockSpan:
        try:
            return await in_daemon_thread(load, start, end)  # Ctrl-C does not wait for it
        except Exception as e:  # any load failure ends serve, with its reason
            raise SystemExit(f"overlay-node serve: cannot load blocks: {e}") from None

    def load_adapters(span: BlockSpan) -> dict:
        from blocks.lora import load_hosted_adapters

        try:
            adapters = load_hosted_adapters(adapter_specs, span)  # configs read once
        except AdapterError as e:
            raise SystemExit(f"overlay-node serve: {e}") from None
        for name in adapters:
            log.info("hosting adapter %s", name)
        return adapters

    host = Host(load_identity(args.identity))
    try:
        host.set_public_addrs(parse_addrs(args.announce_addr) or None)
    except MultiaddrError as e:
        raise SystemExit(f"overlay-node serve: --announce-addr: {e}") from None
    server = dht = announcer = balancer = pinger = warm_up = None
    try:
        try:
            addrs = await host.listen(listen)
        except OSError as e:
            raise SystemExit(f"overlay-node serve: cannot listen on {listen}: "
                             f"{e.strerror or e}") from None
        BandwidthTestService().attach(host)  # other servers measure their link against us
        dht = await serve_placement.start_server_dht(host, [str(b) for b in bootstrap])
        # before loading: a load on another thread would slow the transfers it times
        bps, bps_source = await serve_placement.link_bps(args, host, bootstrap)
        # bitsandbytes (int8_blockwise activations) takes ~2 s to import: imported on the
        # loop by the first such request, it stalled every session for that long
        warm_up = asyncio.ensure_future(in_daemon_thread(bitsandbytes_functional))
        hidden = text_config.hidden_size
        if isinstance(wanted, tuple):  # a fixed span: no placement, no rebalancing
            start, end = wanted
            span = await load_or_exit(start, end)
            adapters = load_adapters(span)
            rates = await in_daemon_thread(lambda: serve_placement.resolve_rates(
                args, model_id, device, dtype, hidden, lambda: span, bps, bps_source))
        else:
            rates = await in_daemon_thread(lambda: serve_placement.resolve_rates(
                args, model_id, device, dtype, hidden, lambda: load(0, 1), bps, bps_source))
            planner = serve_placement.make_planner(args, str(host.peer_id), total, wanted)
            dtype_name = str(dtype).removeprefix("torch.")
            start, end = await serve_placement.choose_span(
                args, planner, dht, host, model_id, total, rates, dtype_name)
            try:
                span = await load_or_exit(start, end)
                adapters = load_adapters(span)
            except SystemExit:
                await serve_placement.withdraw_span(args, dht, host, model_id, total,
                                                    (start, end), rates, dtype_name)
                raise
        server = BlockServer(span, ServingConfig(
            model_id=model_id, cache_tokens=args.cache_tokens, max_length=args.max_length,
            max_request_tokens=args.max_request_tokens,
            max_backward_tokens=args.max_backward_tokens), adapters)
        server.attach(host)
        announcer = Announcer(dht, host, server, rates, total, period=args.announce_period)
        pinger = NextHopPinger(dht, host, server, total, period=args.announce_period)
        announcer.next_pings = pinger.next_pings  # RTTs to the next servers, for routing
        server.push.on_unknown_hop = pinger.refresh_soon  # where pushes may dial
        await announcer.start()
        pinger.start()
        if not isinstance(wanted, tuple):
            balancer = serve_placement.start_balancer(planner, dht, announcer, server, load,
                                                      total)
        print(dialable(addrs[0]), flush=True)
        log.info("serving %s blocks [%d, %d) as %s, announcing %.0f tokens/s at %s", model_id,
                 start, end, host.peer_id, rates.throughput(end - start),
                 " ".join(str(a.without_peer()) for a in host.public_addrs))
        await asyncio.Event().wait()
    finally:
        if warm_up is not None:
            warm_up.cancel()  # (its thread is a daemon: the exit does not wait for it)
        if pinger is not None:
            await pinger.stop()
        if balancer is not None:
            balancer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await balancer
        if announcer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(announcer.stop(), 5)
        if server is not None:
            await server.close()
        if dht is not None:
            with contextlib.suppress(Exception):
                await dht.close()
        await host.close()
    return 0


def _auto_num_blocks(choose_num_blocks, config, device, dtype, args) -> int:
    """`--num-blocks auto`: how many blocks fit (blocks/memory.py's estimate), logged."""
    from blocks.memory import GIB, MemoryEstimateError

    try:
        fit = choose_num_blocks(config, device, dtype, args.quant, args.cache_tokens)
    except (MemoryEstimateError, ValueError, OSError) as e:
        raise SystemExit(f"overlay-node serve: --num-blocks auto: {e}") from None
    log.info("--num-blocks auto: %d blocks fit in %.1f GiB free (%.2f GiB weights + %.2f GiB "
             "cache each, %.2f GiB reserve)", fit.num_blocks, fit.free_bytes / GIB,
             fit.weight_bytes_per_block / GIB, fit.cache_bytes_per_block / GIB,
             fit.reserve_bytes / GIB)
    return fit.num_blocks


def _decode_options(mode: str):
    from blocks.fast_decode import DecodeOptions

    if mode == "plain":
        return DecodeOptions(direct_layers=False, static_cache=False, cuda_graphs=False,
                             compile=False)
    if mode == "auto":
        return DecodeOptions(compile=None)  # compiled on CUDA, where it pays at every size
    if mode == "compiled":  # on any device: a CPU step needs a static cache for it
        return DecodeOptions(static_cache=True, compile=True)
    return DecodeOptions()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run: overlay-node serve")
