"""`Engine.generate` is the reference path: the live scheduler, with nothing live about a session
(no constraints but the grammar, no clock, no forced events, within the context), samples the
tokens `Engine.generate` samples under the grammar mask. Greedy and seeded draws alike (the
seeded ones use the same (seed, position) noise)."""

from __future__ import annotations

import pytest

from improv.engine.constraint_set import ConstraintSet
from improv.engine.engine import Engine
from improv.engine.live import SamplingParams, Scheduler, Token
from improv.engine.tokenizer.vocab import TokenizerConfig, Vocab

V = Vocab(TokenizerConfig())


def grammar(allow_end: bool):
    """A logits processor: the grammar mask of `ConstraintSet`, fed every row's tokens."""
    cs = ConstraintSet(V, [], n_rows=1, allow_end=allow_end)
    fed = [0]

    def processor(tokens, logits):
        cs.feed(tokens[0][fed[0] :], row=0)
        fed[0] = len(tokens[0])
        return cs.logit_mask(logits.device, logits.dtype)

    return processor


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_scheduler_samples_what_engine_generate_samples(make_model, temperature):
    engine = Engine.from_model(make_model(seed=2).double())
    prompt = [V.BOS, V.TASK_CONTINUE, V.part(3), V.program(33)]
    n = 60
    ref = engine.generate(
        prompt, n, temperature=temperature, seed=4, logits_processor=grammar(allow_end=False)
    )
    sched = Scheduler(engine, max_sessions=2)
    s = sched.open_session(prompt, sampling=SamplingParams(temperature=temperature, seed=4))
    s.generate(max_tokens=n)
    sched.run_until_idle()
    got = []
    while not s.events.empty():
        ev = s.events.get_nowait()
        if isinstance(ev, Token):
            got.append(ev.token)
    # (no note rejected here: the policy's redraws use other seeds than Engine.generate)
    assert sched.stats["notes_rejected"] == 0
    assert got == ref
