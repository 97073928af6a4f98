"""Per-token profile (issue 5): one token end to end, client + two servers in ONE process over
real sockets (blocks [0,2) and [2,4) of the small 4x64 test model, push on): CPU per token and
the Python profile (cProfile sees the loop thread only). Prints the client sends per step
(1.0: push is used) and the servers' step-time estimates (under 2 ms: steps run inline).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/profile_token.py TOKENS (n | p [SORT])
"""

import argparse
import asyncio
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import write_model

from overlay.host import Host
from overlay.runtime import new_event_loop

# torch and the blocks and client (4-7 s to import) are imported in main, after the arguments
# are parsed, so that `--help` and typos answer at once.


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def parse_args() -> argparse.Namespace:
    """Read the arguments before anything is built, so `--help` and typos cost nothing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokens", type=int, help="tokens per timed round (5 rounds)")
    parser.add_argument("mode", choices=["n", "p"], help="n: timings only; p: also profile")
    parser.add_argument("sort", nargs="?", default="tottime",
                        choices=sorted(pstats.Stats.sort_arg_dict_default), metavar="SORT",
                        help="pstats sort key of the profile (default tottime; cumulative, ...)")
    args = parser.parse_args()
    if args.tokens < 1:
        parser.error("tokens must be at least 1")
    return args


async def main(model_dir, tokens, profile, sort):
    import torch

    from blocks.server import BlockServer, ServingConfig
    from blocks.span import BlockSpan
    from client.inference import InferenceSession, SessionConfig
    from client.local_head import LocalHead
    from model_parts.files import default_model_id

    model_id = default_model_id(model_dir)
    servers = []
    for start, end in ((0, 2), (2, 4)):
        host = Host()
        [addr] = await host.listen("/ip4/127.0.0.1/tcp/0")
        span = BlockSpan.load(model_dir, start, end)
        server = BlockServer(span, ServingConfig(model_id=model_id))
        server.attach(host)
        servers.append((host, addr, server))
    client = Host()
    route = []
    for (_host, addr, _server), (s, e) in zip(servers, ((0, 2), (2, 4))):
        client.add_peer_addrs(addr.peer_id, [addr])
        route.append((addr.peer_id, s, e))
    head = LocalHead.load(model_dir)
    prompt = torch.tensor([[1, 17, 42, 99, 7, 256, 311, 5]])
    async with InferenceSession(client, model_id, route, SessionConfig(max_length=4096)) as session:
        hidden = await session.step(head.embed(prompt))

        def one():
            token = head.logits(hidden[:, -1:]).argmax(-1)
            return head.embed(token, position_ids=session.position)

        for _ in range(20):
            hidden = await session.step(one())
        sends0 = session.client_sends
        best = []
        for _ in range(5):
            t = cpu()
            w = time.perf_counter()
            for _ in range(tokens):
                hidden = await session.step(one())
            best.append(((cpu() - t) / tokens * 1e3, (time.perf_counter() - w) / tokens * 1e3))
        print("client sends per step:", (session.client_sends - sends0) / (5 * tokens))
        best.sort()
        print(
            f"CPU ms/token (client+2 servers, one process): min {best[0][0]:.3f} "
            f"median {best[2][0]:.3f}; wall min {min(b[1] for b in best):.3f}"
        )
        if profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(200):
                hidden = await session.step(one())
            pr.disable()
            st = pstats.Stats(pr)
            print("python calls per token:", st.total_calls / 200)
            st.sort_stats(sort).print_stats(45)
    print(
        "server step estimates (ms):",
        [round(srv._seconds_per_token * 1e3, 3) for _, _, srv in servers],
    )
    await client.close()
    for host, _addr, server in servers:
        await server.close()
        await host.close()


if __name__ == "__main__":
    args = parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model("small-4x64", Path(tmp))
        with asyncio.Runner(loop_factory=new_event_loop) as r:
            r.run(main(model_dir, args.tokens, args.mode == "p", args.sort))
