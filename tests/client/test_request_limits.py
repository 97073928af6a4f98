"""Servers that take small requests (`serve --max-request-tokens`), against real `overlay-node
serve` processes: the client cuts forwards and inference steps to each server's announced
limit and gets what transformers gives locally; a server that cannot take even one position
of every row of a session is left out of its route, with the limit named.

The two servers have different limits (64 and 40 tokens), so cutting per server and cutting
a pushed step to the smallest limit of its chain both matter."""

from __future__ import annotations

import pytest
import torch

from client.local_swarm import LocalSwarm
from client.model import ModelUnavailableError, RemoteModel
from tests.client.test_fault_tolerance import wait_until_visible
from tests.model_factory import NUM_LAYERS, VOCAB_SIZE

pytestmark = pytest.mark.slow

LIMITS = {(0, 2): 64, (2, NUM_LAYERS): 40}
TOLERANCE = 1e-4  # as tests/client/test_exactness.py
LOW, HIGH = 3, VOCAB_SIZE  # prompt token ids clear of pad, bos and eos


def prompts(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(LOW, HIGH, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    local = LocalSwarm(model_dir, [], log_dir=tmp_path_factory.mktemp("logs"))
    with local:
        for (start, end), limit in LIMITS.items():
            local.start_server(start, end, "--max-request-tokens", str(limit))
        yield local


@pytest.fixture
async def model(swarm, model_dir):
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await wait_until_visible(model, len(LIMITS))
        yield model
    finally:
        await model.close()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


async def test_servers_announce_their_limits(model):
    view = await model.blocks.view(refresh=True)
    assert sorted(info.max_request_tokens for info in view.servers.values()) == [40, 64]


@pytest.mark.parametrize(("batch", "length"), [
    (5, 30),  # rows fit every server, the batch none: split by rows, per server
    (1, 100),  # one row longer than both limits: run as a session in steps
    (3, 70),  # several such rows
])
async def test_a_forward_larger_than_the_limits_gives_the_local_logits(model, reference, batch,
                                                                       length):
    ids = prompts(batch, length, seed=batch * 1000 + length)
    with torch.no_grad():
        expected = reference(ids).logits
    got = await model.logits(ids)
    assert max_diff(got, expected) <= TOLERANCE


async def test_a_padded_forward_longer_than_the_limits_gives_the_local_logits(model, reference):
    ids = prompts(2, 90, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :25] = 0  # left padding of the first row
    ids[0, :25] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    got = await model.logits(ids, attention_mask=mask)
    real = mask.bool()
    assert max_diff(got[real], expected[real]) <= TOLERANCE


@pytest.mark.parametrize(("batch", "length"), [(1, 150), (3, 45)])
async def test_a_prefill_longer_than_the_limits_gives_the_local_tokens(model, reference, batch,
                                                                        length):
    ids = prompts(batch, length, seed=length)
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
    got = await model.generate(ids, max_new_tokens=6)
    assert torch.equal(got, expected)
    spans = model._last_session.spans
    assert [span.max_request_tokens for span in spans] == list(LIMITS.values())


async def test_a_step_of_the_session_api_larger_than_a_limit_matches_a_forward(model):
    hidden = torch.randn(2, 33, model.config.hidden_size, generator=torch.Generator()
                         .manual_seed(3))
    whole = await model.forward_blocks(hidden)
    async with await model.open_blocks_session(2, 64) as session:
        first = await session.step(hidden[:, :30])  # 60 tokens: 40 is the chain's limit
        second = await session.step(hidden[:, 30:])
    assert max_diff(torch.cat([first, second], dim=1), whole) <= TOLERANCE


async def test_a_batch_larger_than_a_limit_cannot_open_a_session(model):
    """One position of every row (50 tokens) is more than the [2, 4) server takes: no route,
    and the error says why."""
    with pytest.raises(ModelUnavailableError, match=r"40 tokens per request, 50 needed"):
        await model.inference_session(50, 8)
