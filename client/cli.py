"""`overlay-node status` and `overlay-node generate`: looking at a swarm, and using it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys

from overlay.cli.arguments import (  # timeouts as `ping` and `dht` take them, numbers
    integer,
    non_negative_int,
    number,
    positive_seconds,
)

log = logging.getLogger("client.cli")


def add_status_parser(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="the swarm: models, servers, spans, coverage")
    status.add_argument("--bootstrap", action="append", required=True, metavar="MADDR",
                        type=_multiaddr)
    status.add_argument("--json", action="store_true", help="one JSON object on standard output")
    status.add_argument("--model", metavar="ID", help="read only this model (by default a status "
                        "reads a bounded number of models and blocks and lists the others)")
    status.add_argument("--timeout", type=positive_seconds, default=30.0,
                        help="give up after this many seconds, joining the swarm (dialing the "
                             "bootstrap peers) included (default 30)")
    status.set_defaults(func=run_status)


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text through the swarm",
                         description="Greedy (default) or sampled generation through the swarm; "
                                     "only the embeddings and the head run here.")
    gen.add_argument("model_dir", metavar="MODEL_DIR")
    gen.add_argument("--bootstrap", action="append", required=True, metavar="MADDR",
                     type=_multiaddr)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append",
                      help="text (needs a tokenizer in MODEL_DIR); repeat for a batch")
    what.add_argument("--input-ids", action="append",
                      help="token ids, comma-separated: 1,2,3; repeat for a batch")
    gen.add_argument("--max-new-tokens", type=non_negative_int, default=32)
    gen.add_argument("--model-id", help="default: derived from MODEL_DIR like the servers do")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=_temperature, default=1.0)
    gen.add_argument("--top-k", type=non_negative_int, default=0, help="0: off")
    gen.add_argument("--top-p", type=_top_p, default=1.0)
    gen.add_argument("--seed", type=_seed, default=0)
    gen.add_argument("--connect-timeout", type=positive_seconds, default=30.0, metavar="S",
                     help="give up joining the swarm (dialing the bootstrap peers included) "
                          "after S seconds (default 30)")
    gen.add_argument("--compression", default="none",
                     choices=["none", "float16", "bfloat16", "int8_blockwise"])
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object as the last line (key new_tokens: a list of "
                          "ids, or one list per prompt for a batch, each up to and including "
                          "its end token)")
    gen.set_defaults(func=run_generate, preload=("torch", "client.model"))  # see serve's


# Checked while parsing (exit 2 with argparse's usage), as GenerationParams and torch would
# refuse them only after the swarm was joined.
def _temperature(text: str) -> float:
    value = number(text)
    if not value > 0:  # nan too
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _top_p(text: str) -> float:
    value = number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _seed(text: str) -> int:
    """What torch.manual_seed takes: -2**63 <= seed < 2**64."""
    value = integer(text)
    if not -(1 << 63) <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"must lie in [-2**63, 2**64), got {value}")
    return value


def _multiaddr(text: str) -> str:
    """A --bootstrap value, refused at once (exit 2, with the reason) when malformed."""
    from overlay.multiaddr import Multiaddr, MultiaddrError

    try:
        Multiaddr.parse(text)
    except MultiaddrError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


async def run_status(args: argparse.Namespace) -> int:
    from client.swarm import SwarmClient
    from client.swarm_status import left_out_note, read_status
    from overlay.dht.driver import DHTError

    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout
    try:
        async with asyncio.timeout_at(deadline):
            client = await SwarmClient.connect(args.bootstrap)
    except (DHTError, ValueError) as e:
        print(f"overlay-node status: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"overlay-node status: could not join the swarm through {args.bootstrap} within "
              f"{args.timeout:g} s", file=sys.stderr)
        return 1
    try:
        async with asyncio.timeout_at(deadline):
            status = await read_status(client, args.model)
    except TimeoutError:
        print(f"overlay-node status: no complete answer from the swarm within {args.timeout:g} s",
              file=sys.stderr)
        return 1
    finally:
        await client.close()
    # Like `dht get` of a missing key: a named model that is not there is a failure.
    missing = args.model is not None and not status["models"]
    if args.json:
        print(json.dumps(status))
        return 1 if missing else 0
    if missing:
        print(f"overlay-node status: {left_out_note(status, args.model)}", file=sys.stderr)
        return 1
    if not status["models"] and not status["left_out"]:  # (a missing named one: above)
        print("no models are announced in this swarm")
    for model in status["models"]:
        coverage = model["coverage"]
        covered = sum(1 for c in coverage if c > 0)
        print(f"model {model['model_id']}: {model['num_blocks']} blocks, "
              f"{covered}/{len(coverage)} covered, servers online per block: "
              f"{_compress(coverage)}")
        for server in model["servers"]:
            print(f"  {server['peer_id']}  blocks [{server['start']}, {server['end']})  "
                  f"{server['state']:<7}  {server['throughput']:.0f} tok/s  "
                  f"cache free {server['cache_tokens_left']}  {server['dtype']}")
    if (note := left_out_note(status, args.model)) is not None:
        print(note)
    return 0


def _compress(values: list[int]) -> str:
    """[2, 2, 2, 1] -> '2x3 1'"""
    out, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        out.append(f"{values[i]}x{j - i}" if j - i > 1 else str(values[i]))
        i = j
    return " ".join(out)


async def run_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from client.generation import GenerationParams
    from client.inference import InferenceError
    from client.model import RemoteModel
    from client.routing import MissingBlocksError
    from client.text_stream import PROMPT_CONTEXT_TOKENS, TextStream
    from model_parts.files import ModelFilesError
    from overlay.dht.driver import DHTError
    from overlay.host import RemoteError
    from overlay.streams import ConnectionLost

    tokenizer = None
    if args.prompt is not None:
        tokenizer = _load_tokenizer(args.model_dir)
        rows = [tokenizer(text).input_ids for text in args.prompt]
    else:
        try:
            rows = [[int(t) for t in ids.split(",")] for ids in args.input_ids]
            if any(abs(t) >= 1 << 63 for row in rows for t in row):
                raise ValueError
        except ValueError:
            raise SystemExit("overlay-node generate: --input-ids must be integers, e.g. 1,2,3") \
                from None
    if not all(rows):
        raise SystemExit("overlay-node generate: a prompt must hold at least one token")
    pad = 0  # what fills the padding: masked out, so any id the model knows
    if tokenizer is not None:
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None),
                   0)
    # Prompts of different lengths: left-padded, the padding marked in the attention mask.
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batch = len(rows)
    try:
        model = await RemoteModel.open(args.model_dir, bootstrap=args.bootstrap,
                                       compression=args.compression, model_id=args.model_id,
                                       connect_timeout=args.connect_timeout)
    except (ModelFilesError, DHTError, ValueError, OSError, TimeoutError) as e:
        print(f"overlay-node generate: {e}", file=sys.stderr)
        return 1
    sampling = {"do_sample": args.sample}
    if args.sample:
        torch.manual_seed(args.seed)
        sampling.update(temperature=args.temperature, top_p=args.top_p)
        if args.top_k:
            sampling["top_k"] = args.top_k

    decode = None
    if tokenizer is not None:
        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

    streaming = not args.json and batch == 1  # a batch is printed row by row at the end
    stream = None
    if streaming and decode is not None:
        stream = TextStream(decode, context=rows[0][-PROMPT_CONTEXT_TOKENS:])

    shown = [0]  # tokens printed so far

    def show(new: torch.Tensor) -> None:
        if streaming:
            token_ids = new.reshape(-1).tolist()
            if stream:
                text = stream.push(token_ids)
            else:  # ids as --input-ids takes them: comma-separated
                text = ("," if shown[0] else "") + ",".join(map(str, token_ids))
            shown[0] += len(token_ids)
            print(text, end="", flush=True)

    def end_line() -> None:
        if shown[0]:
            print(flush=True)  # the streamed text ends its line

    try:
        params = GenerationParams.from_kwargs(None, model.config,
                                              max_new_tokens=args.max_new_tokens, **sampling)
        began = time.perf_counter()
        output = await model.generate(
            input_ids, params, on_tokens=show,
            attention_mask=None if bool(attention_mask.all()) else attention_mask)
        elapsed = time.perf_counter() - began
        route = [f"{s.peer_id}[{s.start}:{s.end})" for s in model.last_route]
        if stream is not None:
            print(stream.finish(), end="", flush=True)
        end_line()
    except (MissingBlocksError, InferenceError, RemoteError, ConnectionLost, TimeoutError,
            ValueError) as e:
        # The swarm cannot serve this request now (blocks missing, every server failed,
        # a refusal): the reason, not a traceback. Tokens already shown stay shown.
        end_line()
        print(f"overlay-node generate: {e}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:  # Ctrl-C: what was shown stays, on a line of its own
        end_line()
        raise
    finally:
        with contextlib.suppress(Exception):
            await model.close()
    # a row that ended is padded until the others end too: its tokens stop at its end token
    new_rows = [_through_end(row, params.eos_token_id) for row in output[:, width:].tolist()]
    steps = output.shape[1] - width
    # None (JSON null) when no step ran: a time per token of none would be made up
    ms_per_token = round(elapsed * 1000 / steps, 3) if steps else None
    if args.json:
        print(json.dumps({"new_tokens": new_rows[0] if batch == 1 else new_rows, "route": route,
                          "ms_per_token": ms_per_token}))
    else:
        if batch > 1:
            for i, ids in enumerate(new_rows):
                text = decode(ids) if decode else ",".join(map(str, ids))
                print(f"[{i}] {text}")
        speed = "" if ms_per_token is None else f", {ms_per_token:.1f} ms/step"
        print(f"{steps} steps of {batch} x 1 token{speed}, route "
              f"{' -> '.join(route) or 'none (no step to run)'}", file=sys.stderr)
    return 0


def _through_end(row: list[int], ends: tuple[int, ...]) -> list[int]:
    """The tokens of `row` up to and including its first end token."""
    for i, token in enumerate(row):
        if token in ends:
            return row[:i + 1]
    return row


def _load_tokenizer(model_dir: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # any failure: the directory has no usable tokenizer
        reason = " ".join(str(e).split())  # transformers' reasons span lines: keep one
        raise SystemExit(f"overlay-node generate: {model_dir} has no tokenizer ({reason}); "
                         "use --input-ids instead") from None
