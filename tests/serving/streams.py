"""Helpers the vLLM tests share: the transformers side of a stream fed in vLLM's passes, and a spy on
vLLM's preemptions."""

import torch


def greedy_turn(model, cache, ids: list[int], new: int) -> list[int]:
    """Feed ``ids`` to ``cache`` in one pass, then ``new`` greedy tokens one pass each, the last one not fed
    (as vLLM leaves a finished request: its final sampled token never gets a KV slot)."""
    from lacache.cache.generation import next_positions

    out, x = [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=x, position_ids=next_positions(cache, x.shape[1], "cpu"),
                           past_key_values=cache).logits[0, -1]
            out.append(int(logits.argmax()))
            x = torch.tensor([[out[-1]]])
    return out


def spy_preemptions(scheduler) -> list[str]:
    """The ids of the requests ``scheduler`` preempts from now on (vLLM's own preemption path still runs)."""
    preempted = []
    original = scheduler._preempt_request

    def spy(request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = spy
    return preempted
