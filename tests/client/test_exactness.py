"""Distributed inference is exact: for each family, a float32 random model served in two spans by
two separate `overlay-node serve` processes gives what the same model gives run locally by
transformers (greedy tokens, logits, step-by-step inference, batches, seeded sampling); and bad
input reaching the servers through the client gets a clear error while the servers keep serving.

One swarm per family (class-scoped), shared by all its checks: starting one costs ~20 s here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import itertools
import threading
import time

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from blocks.protocol import BAD_INPUT, TOO_LONG
from client.causal_lm import DistributedModelForCausalLM, RemoteSessionCache
from client.inference import BlocksUnavailableError, InferenceError
from client.local_swarm import LocalSwarm
from client.model import ModelUnavailableError, RemoteModel
from model_parts.skeleton import ModelInputError
from overlay.host import RemoteError
from tests.model_factory import (
    HIDDEN_SIZE,
    MAX_POSITIONS,
    NUM_LAYERS,
    VOCAB_SIZE,
    build_model,
    save_model,
)

pytestmark = pytest.mark.slow

SPANS = [(0, 2), (2, NUM_LAYERS)]
TOLERANCE = 1e-4
NEW_TOKENS = 64
KILL_TOKENS = 200  # a generation long enough to be under way when a server is killed
RECOVERY_TIMEOUT = 3.0  # seconds the client looks for a replacement of the killed server
# Token ids used in prompts: clear of the special tokens 0 (pad), 1 (bos), 2 (eos).
LOW, HIGH = 3, VOCAB_SIZE


def prompts(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(LOW, HIGH, (batch, length), generator=torch.Generator().manual_seed(seed))


class Collector(BaseStreamer):
    """A transformers streamer that keeps what it is given."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1))

    def end(self) -> None:
        self.ended = True


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class SwarmPool:
    """One swarm per test class, the next class's started in the background while the current
    class's tests run (startup is mostly waiting for three processes to import torch).

    Model directories are written up front on the test thread: building a model seeds torch's
    global random generator, which the seeded-sampling tests rely on.
    """

    def __init__(self, classes: list[type], root) -> None:
        self._order = classes
        self._dirs = {family: save_model(family, root / family)
                      for family in {c.family for c in classes}}
        self._logs = root / "logs"
        self._starting: dict[type, concurrent.futures.Future] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(1)
        self._stopper = concurrent.futures.ThreadPoolExecutor(1)
        self._stopping: list[concurrent.futures.Future] = []

    def _start(self, cls: type) -> tuple:
        swarm = LocalSwarm(self._dirs[cls.family], cls.spans, extra_serve_args=cls.serve_args,
                           log_dir=self._logs / cls.__name__)
        return self._dirs[cls.family], swarm.start()

    def _prefetch(self, cls: type) -> None:
        if cls not in self._starting:
            self._starting[cls] = self._executor.submit(self._start, cls)

    def take(self, cls: type) -> tuple:
        self._prefetch(cls)
        later = self._order[self._order.index(cls) + 1:] if cls in self._order else []
        if later:
            self._prefetch(later[0])
        return self._starting.pop(cls).result()

    def release(self, swarm: LocalSwarm) -> None:
        """Stop a class's swarm in the background (its processes exit gracefully, slowly)."""
        self._stopping.append(self._stopper.submit(swarm.stop))

    def close(self) -> None:
        for future in self._starting.values():
            with contextlib.suppress(Exception):
                self.release(future.result()[1])
        self._executor.shutdown()
        self._stopper.shutdown()  # waits: every process is stopped (by pid) when this returns
        for future in self._stopping:
            future.result()


@pytest.fixture(scope="module")
def swarm_pool(request, tmp_path_factory):
    classes = []
    for item in request.session.items:
        cls = getattr(item, "cls", None)
        if cls is not None and issubclass(cls, _Served) and cls not in classes:
            classes.append(cls)
    pool = SwarmPool(classes, tmp_path_factory.mktemp("swarms"))
    yield pool
    pool.close()


class _Served:
    family = "llama"
    spans = SPANS
    serve_args: tuple[str, ...] = ()

    @pytest.fixture(scope="class")
    @classmethod
    def swarm(cls, swarm_pool):
        model_dir, swarm = swarm_pool.take(cls)
        try:
            yield model_dir, swarm
        finally:
            swarm_pool.release(swarm)

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls):
        return build_model(cls.family)

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, swarm):
        model_dir, local_swarm = swarm
        model = DistributedModelForCausalLM.from_pretrained(model_dir,
                                                            bootstrap=[local_swarm.bootstrap])
        yield model
        model.close()


class _Exactness(_Served):
    def test_greedy_tokens_match_local_generate(self, model, reference):
        ids = prompts(1, 7, seed=1)
        expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        streamer = Collector()
        got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        assert torch.equal(got, expected)
        # 64 new tokens unless the model itself produced its end token earlier
        assert got.shape[1] == ids.shape[1] + NEW_TOKENS or got[0, -1] == 2
        assert streamer.ended and torch.equal(torch.cat(streamer.chunks, dim=-1), got[0])

    def test_end_token_stops_like_local(self, model, reference):
        ids = prompts(3, 5, seed=10)
        free = reference.generate(ids, max_new_tokens=12, do_sample=False)
        end = int(free[0, 5 + 3])  # the 4th token of the first sequence ends it early
        settings = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": end,
                    "pad_token_id": 0}
        expected = reference.generate(ids, **settings)
        assert (expected[0, 5 + 4:] == 0).all()
        assert torch.equal(model.generate(ids, **settings), expected)

    def test_forward_logits_match(self, model, reference):
        for ids in (prompts(1, 13, seed=2), prompts(3, 9, seed=3)):
            with torch.no_grad():
                expected = reference(ids).logits
            got = model(input_ids=ids).logits
            assert got.shape == expected.shape
            assert max_diff(got, expected) <= TOLERANCE

    def test_input_embeddings_build_inputs_embeds_as_transformers_does(self, model, reference):
        """transformers, PEFT and user code build `inputs_embeds` with get_input_embeddings();
        it used to raise transformers' NotImplementedError."""
        ids = prompts(2, 6, seed=17)
        if self.family == "bloom":  # a norm follows the lookup: no such module
            with pytest.raises(NotImplementedError, match=r"model\.embed"):
                model.get_input_embeddings()
            return
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
            local_embeds = reference.get_input_embeddings()(ids)
        assert torch.equal(embeds, local_embeds)
        assert max_diff(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits) == 0
        assert max_diff(model(inputs_embeds=embeds).logits,
                        reference(inputs_embeds=local_embeds).logits) <= TOLERANCE
        lm_head = model.get_output_embeddings()
        assert torch.equal(lm_head.weight, reference.get_output_embeddings().weight)

    def test_left_padded_forward_matches_on_real_tokens(self, model, reference):
        ids = prompts(3, 8, seed=4)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        mask[2, :1] = 0
        ids = ids.masked_fill(mask == 0, 0)
        with torch.no_grad():
            expected = reference(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        assert max_diff(got[real], expected[real]) <= TOLERANCE

    def test_left_padded_batch_generates_like_local(self, model, reference, swarm):
        """Prompts of different lengths in one batch: the session keeps their padding; greedy
        tokens equal transformers' generate given the same attention mask, through the
        transformers-style model and through the asyncio API."""
        ids = prompts(3, 7, seed=14)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        mask[2, :1] = 0
        ids = ids.masked_fill(mask == 0, 0)
        settings = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
        expected = reference.generate(ids, attention_mask=mask, **settings)
        assert torch.equal(model.generate(ids, attention_mask=mask, **settings), expected)
        model_dir, local_swarm = swarm

        async def run():
            async with await RemoteModel.open(model_dir, [local_swarm.bootstrap]) as remote:
                return await remote.generate(ids, attention_mask=mask, **settings)

        assert torch.equal(asyncio.run(run()), expected)

    def test_beam_search_matches_local(self, model, reference):
        """The servers reorder their caches' rows with each step as transformers reorders a
        local cache; a batch of 2 prompts, 3 beams each, one of them left-padded."""
        ids = prompts(2, 6, seed=15)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        ids = ids.masked_fill(mask == 0, 0)
        settings = {"num_beams": 3, "max_new_tokens": 12, "do_sample": False,
                    "pad_token_id": 0, "num_return_sequences": 2}
        expected = reference.generate(ids, attention_mask=mask, **settings)
        assert torch.equal(model.generate(ids, attention_mask=mask, **settings), expected)

    def test_step_by_step_logits_match(self, model, reference):
        ids = prompts(1, 16, seed=5)
        with torch.no_grad():
            expected = reference(ids).logits
        # a multi-token prefix, single tokens, then multi-token steps after the prefix
        cuts = [0, 5, 6, 7, 8, 11, 16]
        with model.inference_session(max_length=32) as session:
            for lo, hi in itertools.pairwise(cuts):
                out = model(input_ids=ids[:, lo:hi], past_key_values=session).logits
                assert session.get_seq_length() == hi
                assert max_diff(out, expected[:, lo:hi]) <= TOLERANCE, (lo, hi)
            # move back (as speculative decoding does) and take another branch
            session.crop(9)
            other = prompts(1, 3, seed=6)
            branch = torch.cat([ids[:, :9], other], dim=1)
            with torch.no_grad():
                expected_branch = reference(branch).logits[:, 9:]
            out = model(input_ids=other, past_key_values=session).logits
            assert max_diff(out, expected_branch) <= TOLERANCE

    def test_batch_of_three(self, model, reference):
        ids = prompts(3, 6, seed=7)
        expected = reference.generate(ids, max_new_tokens=24, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False), expected)
        with torch.no_grad():
            full = reference(expected).logits
        with model.inference_session(max_length=40, batch_size=3) as session:
            first = model(input_ids=expected[:, :6], past_key_values=session).logits
            second = model(input_ids=expected[:, 6:10], past_key_values=session).logits
        assert max_diff(first, full[:, :6]) <= TOLERANCE
        assert max_diff(second, full[:, 6:10]) <= TOLERANCE

    @pytest.mark.parametrize("settings", [
        {},
        {"top_k": 10, "temperature": 0.7},
        {"top_p": 0.8, "repetition_penalty": 1.3},
    ])
    def test_seeded_sampling_matches_local(self, model, reference, settings):
        ids = prompts(2, 5, seed=8)
        torch.manual_seed(1234)
        expected = reference.generate(ids, max_new_tokens=32, do_sample=True, **settings)
        torch.manual_seed(1234)
        got = model.generate(ids, max_new_tokens=32, do_sample=True, **settings)
        assert torch.equal(got, expected)

    def test_asyncio_api_matches_local(self, swarm, reference):
        model_dir, local_swarm = swarm
        ids = prompts(1, 6, seed=9)
        greedy = reference.generate(ids, max_new_tokens=16, do_sample=False)
        torch.manual_seed(99)
        sampled = reference.generate(ids, max_new_tokens=16, do_sample=True, top_p=0.9)
        with torch.no_grad():
            logits = reference(ids).logits

        batch = prompts(3, 5, seed=10)
        end = int(reference.generate(batch, max_new_tokens=12, do_sample=False)[1, 5 + 2])
        ended = reference.generate(batch, max_new_tokens=12, do_sample=False, eos_token_id=end,
                                   pad_token_id=0)

        async def run():
            async with await RemoteModel.open(model_dir, [local_swarm.bootstrap]) as remote:
                streamed = []
                got_logits = await remote.logits(ids)
                got_greedy = await remote.generate(ids, max_new_tokens=16,
                                                   on_tokens=streamed.append)
                torch.manual_seed(99)
                got_sampled = await remote.generate(ids, max_new_tokens=16, do_sample=True,
                                                    top_p=0.9)
                got_ended = await remote.generate(batch, max_new_tokens=12, eos_token_id=end,
                                                  pad_token_id=0)
                # continue one session over two calls
                async with await remote.inference_session(1, 32) as session:
                    half = await remote.generate(ids, max_new_tokens=8, session=session)
                    whole = await remote.generate(half, max_new_tokens=8, session=session)
                    # another batch size: named (it said "a non-empty [batch, length] tensor")
                    with pytest.raises(ModelInputError, match="opened for 1"):
                        await remote.generate(whole[:, :4].repeat(2, 1), max_new_tokens=2,
                                              session=session)
                return got_logits, got_greedy, streamed, got_sampled, got_ended, whole

        got_logits, got_greedy, streamed, got_sampled, got_ended, whole = asyncio.run(run())
        assert max_diff(got_logits, logits) <= TOLERANCE
        assert torch.equal(got_greedy, greedy)
        assert torch.equal(torch.cat(streamed), greedy[0, ids.shape[1]:])
        assert torch.equal(got_sampled, sampled)
        assert torch.equal(got_ended, ended)
        assert torch.equal(whole, greedy)


class TestLlama(_Exactness):
    family = "llama"

    def test_compressed_activations_stay_close(self, swarm, reference):
        model_dir, local_swarm = swarm
        ids = prompts(2, 9, seed=11)
        with torch.no_grad():
            expected = reference(ids).logits
        # bounds measured on this model: float16 ~3e-3, int8_blockwise ~0.2
        for compression, bound in (("float16", 2e-2), ("int8_blockwise", 1.0)):
            with DistributedModelForCausalLM.from_pretrained(
                model_dir, bootstrap=[local_swarm.bootstrap], compression=compression
            ) as model:
                diff = max_diff(model(input_ids=ids).logits, expected)
                assert 0 < diff <= bound, (compression, diff)
                tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
                assert tokens.shape == (2, 13)

    def test_generate_arguments_as_transformers_reads_them(self, model, reference):
        ids = prompts(2, 8, seed=13)
        with torch.no_grad():
            embeds = reference.get_input_embeddings()(ids)
        cases = [
            ({"inputs_embeds": embeds, "max_new_tokens": 6}, {"inputs_embeds": None}),
            ({"input_ids": ids, "inputs_embeds": embeds, "max_new_tokens": 6},
             {"inputs_embeds": None}),
            ({"input_ids": ids}, {}),  # transformers' default length
            ({"input_ids": ids, "max_length": 13}, {}),
            ({"input_ids": ids, "do_sample": True, "num_return_sequences": 2,
              "max_new_tokens": 5}, {}),
        ]
        for local_args, remote_changes in cases:
            remote_args = dict(local_args)
            if "inputs_embeds" in remote_changes:
                remote_args["inputs_embeds"] = model.embed(ids)
            torch.manual_seed(21)
            expected = reference.generate(**local_args)
            torch.manual_seed(21)
            got = model.generate(**remote_args)
            assert torch.equal(got, expected), local_args.keys()
        local = reference.generate(ids, max_new_tokens=4, return_dict_in_generate=True,
                                   output_scores=True)
        remote = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True,
                                output_scores=True)
        assert torch.equal(remote.sequences, local.sequences)
        assert max(max_diff(a, b) for a, b in zip(remote.scores, local.scores)) <= TOLERANCE
        for flag in ("output_hidden_states", "output_attentions"):  # not tuples of None
            with pytest.raises(NotImplementedError, match="logits only"):
                model.generate(ids, max_new_tokens=2, return_dict_in_generate=True,
                               **{flag: True})

    def test_a_forward_larger_than_a_servers_request_limit_is_split(self, model, reference):
        """17500 tokens: servers take 16384 in one request; it was refused (bad_input)."""
        ids = prompts(70, 250, seed=17)
        with torch.no_grad():
            expected = reference(ids).logits
        assert max_diff(model(input_ids=ids).logits, expected) <= TOLERANCE

    def test_float_and_bool_masks_are_taken_like_transformers_takes_them(self, model, reference,
                                                                         swarm):
        """transformers' causal LMs take 0.0/1.0 float masks (and booleans): so do forward,
        generate and the asyncio API, with the results of the integer mask; other values are
        a clear ValueError, not a guess."""
        ids = prompts(2, 7, seed=16)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        ids = ids.masked_fill(mask == 0, 0)
        settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        expected = reference.generate(ids, attention_mask=mask, **settings)
        with torch.no_grad():
            logits = reference(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        for dtype in (torch.float32, torch.float16, torch.bool):
            typed = mask.to(dtype)
            assert torch.equal(model.generate(ids, attention_mask=typed, **settings), expected)
            got = model(input_ids=ids, attention_mask=typed).logits
            assert max_diff(got[real], logits[real]) <= TOLERANCE, dtype
        model_dir, local_swarm = swarm

        async def run():
            async with await RemoteModel.open(model_dir, [local_swarm.bootstrap]) as remote:
                got = await remote.logits(ids, attention_mask=mask.float())
                return got, await remote.generate(ids, attention_mask=mask.float(), **settings)

        got, tokens = asyncio.run(run())
        assert max_diff(got[real], logits[real]) <= TOLERANCE
        assert torch.equal(tokens, expected)
        for bad in (mask * 0.5, mask * 2, torch.full_like(mask, float("nan"), dtype=torch.float)):
            with pytest.raises(ValueError, match=r"only 0 \(padding\) and 1"):
                model(input_ids=ids, attention_mask=bad)
            with pytest.raises(ValueError, match=r"only 0 \(padding\) and 1"):
                model.generate(ids, attention_mask=bad, **settings)

    def test_assisted_decoding_matches_local(self, model, reference):
        """Prompt lookup and an assistant model: the session rolls back the rejected draft
        tokens (transformers 5.24 crops by `-rejected`, 0 when every draft was accepted)."""
        ids = prompts(1, 6, seed=14).repeat(1, 2)  # a repeated prompt: lookups find drafts
        expected = reference.generate(ids, max_new_tokens=16, do_sample=False)
        for settings in ({"prompt_lookup_num_tokens": 3}, {"assistant_model": reference}):
            got = model.generate(ids, max_new_tokens=16, do_sample=False, **settings)
            assert torch.equal(got, expected), settings

    def test_a_session_reused_for_a_prompt_sharing_part_of_its_tokens(self, model, reference,
                                                                        swarm):
        """Prompt A, then prompt B that shares only A's first positions (and its padding): B's
        tokens are those of a fresh run; the session kept the shared positions, sent the rest."""
        a = prompts(2, 8, seed=30)
        a[0, :3] = 0
        mask_a = torch.ones_like(a)
        mask_a[0, :3] = 0
        b = torch.cat([a[:, :6], prompts(2, 5, seed=31)], dim=1)  # longer than A + new tokens
        mask_b = torch.cat([mask_a[:, :6], torch.ones(2, 5, dtype=torch.long)], dim=1)
        short = a[1:, :5]  # shorter than what the session holds
        expected = reference.generate(b, attention_mask=mask_b, max_new_tokens=6,
                                      do_sample=False, pad_token_id=0)
        expected_short = reference.generate(short, max_new_tokens=6, do_sample=False)
        with model.inference_session(max_length=64) as session:
            model.generate(a, attention_mask=mask_a, max_new_tokens=6, past_key_values=session,
                           pad_token_id=0)
            got = model.generate(b, attention_mask=mask_b, max_new_tokens=6,
                                 past_key_values=session, pad_token_id=0)
            assert session.get_seq_length() == 11 + 6 - 1
        assert torch.equal(got, expected)

        model_dir, local_swarm = swarm

        async def run():
            async with await RemoteModel.open(model_dir, [local_swarm.bootstrap]) as remote, \
                    await remote.inference_session(1, 64) as session:
                await remote.generate(a[1:], max_new_tokens=6, session=session)
                longer = await remote.generate(b[1:], max_new_tokens=6, session=session)
                shorter = await remote.generate(short, max_new_tokens=6, session=session)
                return longer, shorter

        longer, shorter = asyncio.run(run())
        assert torch.equal(longer, expected[1:])
        assert torch.equal(shorter, expected_short)

    def test_sync_session_continues_across_generate_calls(self, model, reference):
        ids = prompts(1, 6, seed=12)
        expected = reference.generate(ids, max_new_tokens=20, do_sample=False)
        with model.inference_session(max_length=32) as session:
            half = model.generate(ids, max_new_tokens=10, past_key_values=session)
            assert session.get_seq_length() == 6 + 10 - 1
            whole = model.generate(half, max_new_tokens=10, past_key_values=session)
        assert torch.equal(whole, expected)


class TestMistral(_Exactness):
    family = "mistral"


class TestQwen2(_Exactness):
    family = "qwen2"


class TestMixtral(_Exactness):
    family = "mixtral"


class TestBloom(_Exactness):
    family = "bloom"


class TestFalcon(_Exactness):
    family = "falcon"


class TestLearnedPositions(_Served):
    """GPT-2's positions are a learned table (256 rows in the test model). A session of the
    default length (2048) had no server able to run its later positions, and a generation
    past the table failed with transformers' IndexError (a server's: `internal`)."""

    family = "gpt2"

    def test_sessions_fit_the_table_and_longer_ones_are_refused_clearly(self, model, reference):
        ids = prompts(1, 6, seed=31)
        expected = reference.generate(ids, max_new_tokens=8, do_sample=False)
        with model.inference_session() as session:  # the default length: the table's
            assert session.max_length == MAX_POSITIONS
            assert torch.equal(model.generate(ids, max_new_tokens=8, past_key_values=session),
                               expected)
        with pytest.raises(ModelInputError, match="longer than this model's 256 positions"):
            model.generate(prompts(1, 250, seed=32), max_new_tokens=10, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


class TestBadInput(_Served):
    """Bad requests through the client: a clear, typed error; the servers keep serving."""

    family = "llama"
    spans = ((0, 2), (2, NUM_LAYERS), (2, NUM_LAYERS))  # blocks 2-3 twice: one may fail
    # Frequent re-announcements: a record the DHT lost comes back within seconds.
    serve_args = ("--announce-period", "5")

    def check_still_serving(self, model, reference):
        ids = prompts(1, 5, seed=20)
        with torch.no_grad():
            expected = reference(ids).logits
        assert max_diff(model(input_ids=ids).logits, expected) <= TOLERANCE

    def test_unknown_model_id(self, swarm):
        model_dir, local_swarm = swarm
        with DistributedModelForCausalLM.from_pretrained(
            model_dir, bootstrap=[local_swarm.bootstrap], model_id="no-such-model-1234"
        ) as stranger:
            with pytest.raises(ModelUnavailableError, match="no-such-model-1234"):
                stranger(input_ids=prompts(1, 4, seed=21))
            with pytest.raises(ModelUnavailableError, match="no-such-model-1234"):
                stranger.generate(prompts(1, 4, seed=21), max_new_tokens=3)

    def test_wrong_hidden_size_and_dtype(self, model, reference):
        with pytest.raises(RemoteError) as caught:
            model.forward_blocks(torch.randn(1, 4, HIDDEN_SIZE + 1))
        assert caught.value.code == BAD_INPUT and "hidden size" in str(caught.value)
        with pytest.raises(RemoteError) as caught:
            model.forward_blocks(torch.randn(1, 4, HIDDEN_SIZE, dtype=torch.float64))
        assert caught.value.code == BAD_INPUT
        ids = prompts(1, 6, seed=22)
        with torch.no_grad():
            expected = reference(ids).logits
        with model.inference_session(max_length=16) as session:
            model(input_ids=ids[:, :3], past_key_values=session)
            with pytest.raises(RemoteError) as caught:
                session.step(torch.randn(1, 1, HIDDEN_SIZE - 1))
            assert caught.value.code == BAD_INPUT
            # [batch, hidden] read as 64 positions: "67 tokens exceed the session's max_length"
            flat = torch.randn(1, HIDDEN_SIZE)
            with pytest.raises(ModelInputError, match=r"\[batch, new positions"):
                session.step(flat)
            with pytest.raises(ModelInputError, match=r"got \[1, 64\]"):
                model._run(session._session.blocks_session.step(flat))
            # the refused step changed nothing: the session goes on exactly
            assert session.get_seq_length() == 3
            out = model(input_ids=ids[:, 3:], past_key_values=session).logits
            assert max_diff(out, expected[:, 3:]) <= TOLERANCE
        self.check_still_serving(model, reference)

    def test_past_the_session_max_length(self, model, reference):
        ids = prompts(1, 12, seed=23)
        with model.inference_session(max_length=10) as session:
            model(input_ids=ids[:, :8], past_key_values=session)
            with pytest.raises(InferenceError, match="max_length"):
                model(input_ids=ids[:, 8:], past_key_values=session)
            assert session.get_seq_length() == 8
            with pytest.raises(InferenceError, match="max_length"):
                model.generate(ids[:, :8], past_key_values=session, max_new_tokens=8)
        # the servers check too, for clients that do not
        async def too_long():
            session = await model.remote.open_blocks_session(1, 4, start=0, end=2)
            try:
                await session.spans[0].step(torch.randn(1, 6, HIDDEN_SIZE), 0)
            finally:
                await session.close()

        with pytest.raises(RemoteError) as caught:
            model._run(too_long())
        assert caught.value.code in (TOO_LONG, BAD_INPUT) and "max" in str(caught.value)
        # the asyncio generate: refused before any step (it failed after three, tokens lost)
        steps = []

        async def short_session(**where):
            return await model.remote.generate(ids[:, :2], max_new_tokens=5,
                                               on_tokens=steps.append, **where)

        with pytest.raises(ModelInputError, match="max_length >= 6, not 3"):
            model._run(short_session(max_length=3))

        async def in_short_session():
            async with await model.remote.inference_session(1, 4) as session:
                return await short_session(session=session)

        with pytest.raises(ModelInputError, match="max_length >= 6, not 4"):
            model._run(in_short_session())
        assert steps == []
        assert model._run(short_session(max_length=6)).shape == (1, 7)  # exactly enough
        self.check_still_serving(model, reference)

    def test_steps_on_a_closed_session(self, model, reference):
        session = model.inference_session(max_length=16)
        ids = prompts(1, 4, seed=24)
        model(input_ids=ids, past_key_values=session)
        session.close()
        with pytest.raises(InferenceError, match="closed"):
            model(input_ids=ids[:, :1], past_key_values=session)
        with pytest.raises(InferenceError, match="closed"):
            model.generate(ids, past_key_values=session, max_new_tokens=2)
        self.check_still_serving(model, reference)

    def test_bad_session_arguments(self, model):
        remote = model.remote
        for start, end in ((0, NUM_LAYERS + 3), (-1, 2), (3, 1)):  # past the end: IndexError
            with pytest.raises(ValueError, match=rf"block range \[{start}, {end}\) not in"):
                model._run(remote.open_blocks_session(1, 8, start, end))
        with pytest.raises(ValueError, match=r"block range \[2, 2\) is empty"):  # no spans
            model._run(remote.open_blocks_session(1, 8, 2, 2))
        with pytest.raises(TypeError, match="RemoteSessionCache"):
            from transformers import DynamicCache

            model(input_ids=prompts(1, 3, seed=25), past_key_values=DynamicCache())
        with pytest.raises(NotImplementedError, match="cannot be reduced"), \
                model.inference_session(max_length=8) as session:
            session.batch_select_indices(torch.tensor([0]))  # what assisted decoding needs
        with model.inference_session(max_length=8) as session, \
                pytest.raises(ValueError, match="one sequence"):
            model(input_ids=prompts(1, 3, seed=25), past_key_values=session)
            session.reorder_cache(torch.tensor([1]))  # a batch of 1 has no row 1
        with pytest.raises(ModelInputError, match="covers every position"), \
                model.inference_session(max_length=8) as session:
            model(input_ids=prompts(1, 3, seed=25), past_key_values=session,
                  attention_mask=torch.tensor([[1, 1]]))  # the new positions' part only
        assert isinstance(session, RemoteSessionCache)

    def test_closed_models(self, swarm):
        model_dir, local_swarm = swarm
        with DistributedModelForCausalLM.from_pretrained(
            model_dir, bootstrap=local_swarm.bootstrap
        ) as model:
            session = model.inference_session(max_length=8)
            model(input_ids=prompts(1, 3, seed=28), past_key_values=session)
            remote = model.remote
        assert remote.closed and session.get_seq_length() == 3
        with pytest.raises(InferenceError, match="closed"):
            model(input_ids=prompts(1, 3, seed=28))
        with pytest.raises(InferenceError, match="closed"):
            model(input_ids=prompts(1, 1, seed=28), past_key_values=session)
        model.close()  # idempotent
        # sessions of open_blocks_session are closed with their model (they stayed open, the
        # servers' caches taken, when the swarm was shared)
        from client.swarm import SwarmClient

        async def blocks_session_left_open():
            swarm = await SwarmClient.connect([local_swarm.bootstrap])
            try:
                shared = await RemoteModel.open(model_dir, swarm=swarm)
                session = await shared.open_blocks_session(1, 8, 0, 2)
                await session.step(torch.randn(1, 2, HIDDEN_SIZE))
                await shared.close()
                with pytest.raises(InferenceError, match="closed"):
                    await session.step(torch.randn(1, 1, HIDDEN_SIZE))
                return session
            finally:
                await swarm.close()

        assert asyncio.run(blocks_session_left_open())._closed
        # a model that is dropped without close() is closed by the garbage collector
        dropped = DistributedModelForCausalLM.from_pretrained(
            model_dir, bootstrap=local_swarm.bootstrap)
        remote = dropped.remote
        del dropped
        gc.collect()
        assert remote.closed

    def test_servers_killed_mid_generation(self, model, swarm, reference):
        """Last in this class: it kills both servers of blocks [2, 4), one at a time, while a
        generation runs. The first is replaced without changing a token; after the second
        nobody serves those blocks and recovery (given a short deadline) gives up clearly."""
        model_dir, local_swarm = swarm
        ids = prompts(1, 4, seed=27)
        settings = {"max_new_tokens": KILL_TOKENS, "min_new_tokens": KILL_TOKENS,
                    "do_sample": False}
        expected = reference.generate(ids, **settings)
        hidden = model.embed(prompts(1, 6, seed=26))
        before = model.forward_blocks(hidden, 0, 2)
        index_of = {addr.rsplit("/", 1)[1]: i for i, addr in enumerate(local_swarm.server_addrs)}
        impatient = DistributedModelForCausalLM.from_pretrained(
            model_dir, bootstrap=[local_swarm.bootstrap], recovery_timeout=RECOVERY_TIMEOUT)
        killed: list[int] = []

        async def coverage():
            view = await impatient.remote.blocks.view(refresh=True)
            return view.coverage()

        deadline = time.monotonic() + 30
        while impatient._run(coverage()) != [1, 1, 2, 2] and time.monotonic() < deadline:
            time.sleep(0.5)  # until the client sees both servers of blocks 2-3 (DHT catch-up)
        assert impatient._run(coverage()) == [1, 1, 2, 2]

        def kill_second_span_server() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                serving = [s.peer_id for s in impatient.remote.last_route if s.start == 2]
                if serving:
                    time.sleep(0.3)  # let the generation get under way
                    killed.append(index_of[serving[0]])
                    local_swarm.kill_server(killed[-1])
                    return
                time.sleep(0.01)

        try:
            for attempt in range(2):
                killer = threading.Thread(target=kill_second_span_server)
                started = time.monotonic()
                killer.start()
                try:
                    if attempt == 0:
                        assert torch.equal(impatient.generate(ids, **settings), expected)
                        assert len(impatient.remote._last_session.recoveries) == 1
                    else:
                        with pytest.raises(BlocksUnavailableError, match="2-3") as caught:
                            impatient.generate(ids, **settings)
                        assert isinstance(caught.value, InferenceError)
                        assert time.monotonic() - started < RECOVERY_TIMEOUT + 20
                finally:
                    killer.join()
        finally:
            impatient.close()
        assert sorted(killed) == [1, 2]
        # the server of the first span goes on serving, forward passes and sessions
        assert torch.equal(model.forward_blocks(hidden, 0, 2), before)

        async def session_on_first_span():
            session = await model.remote.open_blocks_session(1, 16, start=0, end=2)
            try:
                return await session.step(hidden)
            finally:
                await session.close()

        assert max_diff(model._run(session_on_first_span()), before) <= TOLERANCE
