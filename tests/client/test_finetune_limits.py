"""Fine-tuning through servers that take small requests (`serve --max-request-tokens` and
`--max-backward-tokens`), against real `overlay-node serve` processes: every training pass
here is one chunk (the default 2048 tokens) larger than both limits of both servers, and the
client cuts each span's forward and backward to that server's announced limits, by whole
rows, with the loss and gradients of the same computation run locally (the tolerances of
tests/client/test_finetune.py). A row longer than a limit cannot be cut: servers that could
not run it are left out of the route, and with none left the error names the limit.

The two spans' servers have different limits, so cutting per server matters; the test that
adds a server with the default limits runs last."""

from __future__ import annotations

import pytest
import torch

from client.causal_lm import DistributedModelForCausalLM
from client.local_swarm import LocalSwarm
from client.routing import MissingBlocksError
from tests.client.test_fault_tolerance import wait_until_visible
from tests.client.test_finetune import (
    ALPHA,
    GRAD_TOLERANCE,
    LOSS_TOLERANCE,
    PRE_SEQ_LEN,
    RANK,
    TARGETS,
    assert_lora_grads_match,
    local_prompt_loss,
    peft_model,
    relative_error,
    token_batch,
)
from tests.model_factory import NUM_LAYERS, VOCAB_SIZE

pytestmark = pytest.mark.slow

# (request limit, backward limit) of each span's server
LIMITS = {(0, 2): (40, 24), (2, NUM_LAYERS): (64, 32)}


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    local = LocalSwarm(model_dir, [], log_dir=tmp_path_factory.mktemp("logs"))
    with local:
        for (start, end), (forward, backward) in LIMITS.items():
            local.start_server(start, end, "--max-request-tokens", str(forward),
                               "--max-backward-tokens", str(backward))
        yield local


def open_model(swarm, model_dir, servers: int = len(LIMITS), **kwargs
               ) -> DistributedModelForCausalLM:
    model = DistributedModelForCausalLM.from_pretrained(model_dir, bootstrap=[swarm.bootstrap],
                                                        **kwargs)
    model._run(wait_until_visible(model.remote, servers))
    return model


def lora_model(swarm, model_dir, peft, servers: int = len(LIMITS)):
    from peft import get_peft_model_state_dict

    model = open_model(swarm, model_dir, servers, tuning_mode="lora", lora_rank=RANK,
                       lora_alpha=ALPHA, lora_target_modules=TARGETS)
    model.tuning.lora.load_peft_state_dict(get_peft_model_state_dict(peft))
    return model


def backward_against_peft(model, peft, ids):
    """The loss and its gradients through the swarm and in PEFT; the losses agree."""
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    local = peft(input_ids=ids, labels=ids)
    local.loss.backward()
    assert abs(out.loss.item() - local.loss.item()) <= LOSS_TOLERANCE
    return out


def test_servers_announce_both_limits(swarm, model_dir):
    with open_model(swarm, model_dir) as model:
        view = model._run(model.remote.blocks.view(refresh=True))
    assert sorted((info.max_request_tokens, info.max_backward_tokens)
                  for info in view.servers.values()) == sorted(LIMITS.values())


def test_inputs_embeds_gradient_of_a_padded_batch_matches_local(swarm, model_dir, reference):
    """6 x 9 = 54 tokens: forwards of 4 and 6 rows, backwards of 2 and 3 rows; the padding
    mask is cut with them."""
    ids = token_batch(6, 9, seed=40)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[4, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    with open_model(swarm, model_dir) as model:
        embeds = model.embed(ids, attention_mask=mask).clone().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        out.loss.backward()
    local_embeds = embeds.detach().clone().requires_grad_(True)
    local = reference(inputs_embeds=local_embeds, attention_mask=mask, labels=labels)
    local.loss.backward()
    real = mask.bool()
    assert abs(out.loss.item() - local.loss.item()) <= LOSS_TOLERANCE
    assert relative_error(embeds.grad[real], local_embeds.grad[real]) <= GRAD_TOLERANCE
    assert relative_error(out.logits.detach()[real], local.logits.detach()[real]) \
        <= GRAD_TOLERANCE


def test_deep_prompt_gradients_match_local(swarm, model_dir, reference):
    """5 rows of 4 prompt + 9 token positions: each request's prompts are the span's, and
    their gradients are summed over the requests."""
    ids = token_batch(5, 9, seed=41)
    with open_model(swarm, model_dir, tuning_mode="deep_ptune",
                    pre_seq_len=PRE_SEQ_LEN) as model:
        ptune = model.tuning.ptune
        with torch.no_grad():
            ptune.intermediate_prompt_embeddings.normal_(0, 0.2)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        shallow = ptune.prompt_embeddings.detach().clone().requires_grad_(True)
        deep = ptune.intermediate_prompt_embeddings.detach().clone().requires_grad_(True)
        local = local_prompt_loss(reference, ids, shallow, deep)
        local.backward()
        assert abs(out.loss.item() - local.item()) <= LOSS_TOLERANCE
        assert relative_error(ptune.prompt_embeddings.grad, shallow.grad) <= GRAD_TOLERANCE
        assert relative_error(ptune.intermediate_prompt_embeddings.grad, deep.grad) \
            <= GRAD_TOLERANCE


def test_lora_gradients_match_peft(swarm, model_dir):
    """5 x 10 = 50 tokens; the LoRA goes to each server once, its gradients summed over the
    requests, then one optimizer step gives PEFT's next loss."""
    ids = token_batch(5, 10, seed=42)
    peft = peft_model(seed=43)
    with lora_model(swarm, model_dir, peft) as model:
        out = backward_against_peft(model, peft, ids)
        assert_lora_grads_match(model, peft)
        for params in (model.parameters(), peft.parameters()):
            torch.optim.SGD([p for p in params if p.requires_grad], lr=0.5).step()
        with torch.no_grad():
            after = model(input_ids=ids, labels=ids).loss.item()
            expected = peft(input_ids=ids, labels=ids).loss.item()
        assert after < out.loss.item() - 0.01  # the step changed something
        assert abs(after - expected) <= LOSS_TOLERANCE


def test_a_row_longer_than_every_servers_limit_fails_naming_it(swarm, model_dir):
    """One row of 30 positions fits the [0, 2) server's forwards (40), not its backwards (24):
    a pass without gradients runs, one with them finds no server and says why, as does a
    row of 50 (over 40) without gradients."""
    peft = peft_model(seed=44)
    with lora_model(swarm, model_dir, peft) as model:
        ids = token_batch(1, 30, seed=45)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            assert relative_error(logits, peft(input_ids=ids).logits) <= GRAD_TOLERANCE
        with pytest.raises(MissingBlocksError,
                           match=r"takes at most 24 tokens per backward request, 30 needed"):
            model(input_ids=ids, labels=ids)
        with torch.no_grad(), pytest.raises(
                MissingBlocksError, match=r"takes at most 40 tokens per request, 50 needed"):
            model(input_ids=token_batch(1, 50, seed=46))
        assert model.tuning.trainer.recoveries == 0  # no server was blamed


def test_a_long_row_goes_to_a_server_that_takes_it(swarm, model_dir):
    """Runs last: it adds a [0, 2) server with the default limits. A row of 30 trains through
    it (the small server is left out of the route) with PEFT's gradients."""
    swarm.start_server(0, 2)
    ids = token_batch(2, 30, seed=47)
    peft = peft_model(seed=48)
    with lora_model(swarm, model_dir, peft, servers=len(LIMITS) + 1) as model:
        for _ in range(3):  # each pass draws its route: never the small server
            for p in model.parameters():
                p.grad = None
            peft.zero_grad()
            out = backward_against_peft(model, peft, ids)
            assert_lora_grads_match(model, peft)
        assert out.logits.shape == (2, 30, VOCAB_SIZE)
