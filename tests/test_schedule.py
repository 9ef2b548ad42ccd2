"""Block-length schedules: step graphs at several γ in one artifact, and the runtime choosing among them.

Every step is exact at any γ, so the tests hold the tokens to the primary's, and the choice to what the
schedule's model of speed says it must be for given acceptance and step times.
"""

import jax
import numpy as np
import pytest

from conftest import CONFIGS, make
from tandemc.checkpoint import Checkpoint
from tandemc.decoding import generate
from tandemc.errors import TandemcError
from tandemc.export import export
from tandemc.program import ExportOptions
from tandemc.runtime import load
from tandemc.schedule import Cycle, Measured, StepTimes
from tandemc.tokenizer import ByteTokenizer


def timed(times: dict[int, float]) -> StepTimes:
    """StepTimes that have seen each γ's warm-up and then `times[γ]` seconds."""
    store = StepTimes()
    for gamma, seconds in times.items():
        for _ in range(StepTimes.WARM_UP + 1):
            store.add(gamma, seconds)
    return store


def test_measured_picks_the_most_tokens_per_second():
    times = {0: 1.0, 1: 1.25, 2: 1.5}
    high = Measured((0, 1, 2), timed(times), retime_every=1000)
    for _ in range(20):  # every draft accepted: α near 1, E(2) = 3 tokens for 1.5
        high.observe(2, [2], [2], 1.5)
    assert high.acceptance > 0.9 and high.next() == 2
    low = Measured((0, 1, 2), timed(times), retime_every=1000)
    for _ in range(20):  # every draft rejected: α near 0, a draft buys nothing
        low.observe(1, [1], [0], 1.25)
    assert low.acceptance < 0.1 and low.next() == 0
    middle = Measured((0, 1, 2), timed(times), retime_every=1000)
    for _ in range(40):  # α = 1/2: E(1)/T(1) = 1.5/1.25 beats E(2)/T(2) = 1.75/1.5 and E(0)/T(0) = 1
        middle.observe(1, [1], [1], 1.25)
        middle.observe(1, [1], [0], 1.25)
    assert abs(middle.acceptance - 0.5) < 0.05 and middle.next() == 1
    alpha = middle.acceptance
    assert [middle.expected_tokens(g) for g in (0, 1, 2)] == pytest.approx([1, 1 + alpha, 1 + alpha + alpha ** 2])


def test_measured_times_untimed_and_stale_block_lengths_and_probes_after_primary_steps():
    schedule = Measured((0, 1, 2), StepTimes(), probe_every=3, retime_every=10)
    order = []
    for _ in range(3 * (StepTimes.WARM_UP + 1)):  # nothing timed yet: each γ runs until it is
        gamma = schedule.next()
        order.append(gamma)
        schedule.observe(gamma, [gamma], [0], {0: 1.0, 1: 1.25, 2: 1.4}[gamma])
    assert order == [0] * 3 + [1] * 3 + [2] * 3
    for _ in range(3):  # rejections: γ = 0 is best, but after 3 of them one step at γ = 1 looks again
        assert schedule.next() == 0
        schedule.observe(0, [0], [0], 1.0)
    assert schedule.next() == 1
    schedule.observe(1, [1], [0], 1.25)
    steps = [schedule.next() for _ in range(1)]
    assert steps == [0]
    for _ in range(10):  # γ = 2 not run for 10 steps: timed again, however unpromising
        gamma = schedule.next()
        if gamma == 2:
            break
        schedule.observe(gamma, [gamma], [0], {0: 1.0, 1: 1.25}[gamma])
    assert gamma == 2


def test_step_times_ignore_warm_up_and_keep_the_least_recent_time():
    store = StepTimes(window=3)
    store.add(1, 9.0)
    store.add(1, 9.0)
    assert 1 not in store.seconds
    for seconds in (2.0, 5.0, 3.0):
        store.add(1, seconds)
    assert store.seconds[1] == 2.0
    store.add(1, 4.0)  # 2.0 leaves the window of 3
    assert store.seconds[1] == 3.0


def checkpoint(name):
    cfg, params = make(CONFIGS[name], seed=1)
    return Checkpoint(cfg, jax.tree.map(np.asarray, params), ByteTokenizer())


@pytest.mark.parametrize("name, batch", [("mha-odd-heads", 2), ("draft-vocab", 1)])
def test_artifact_with_several_block_lengths_is_exact_whatever_the_schedule(name, batch, tmp_path):
    """Exported with step graphs at γ = 0, 1 and 3 (2 the default): verification ran them in turn against the
    reference (greedy and sampled); the runtime's own choice, and each γ alone, give the primary's greedy tokens."""
    ckpt = checkpoint(name)
    manifest = export(ckpt, "cpu", tmp_path / "a", ExportOptions(batch=batch, block_length=2, block_lengths=(0, 1, 3),
                                                                 max_seq_len=(48,), prefill_chunk=8,
                                                                 max_new_tokens=16), verify_prompts=2)
    report = manifest["verification"]
    assert report["ok"] and report["greedy_identical"] and report["sampled_identical"], report
    assert manifest["decode"]["block_lengths"] == [0, 1, 2, 3]
    assert {"step.s48", "step_g0.s48", "step_g1.s48", "step_g3.s48"} <= set(manifest["graphs"])
    artifact = load(tmp_path / "a")
    prompts = [[1, 2, 3, 4], [0, 1]][:batch]
    primary = generate(ckpt.params, ckpt.config, prompts, mode="primary", max_new_tokens=20, max_seq_len=48)
    for block_length in ("auto", 0, 1, 2, 3, Cycle((3, 0, 2))):
        run = artifact.run_steps(prompts, 20, block_length=block_length)
        assert run.tokens == primary.tokens, block_length
        if isinstance(block_length, int):
            assert set(run.block_lengths) == {block_length}
            assert run.stats["drafted"] == block_length * run.stats["row_steps"]
    result = artifact.generate(prompts, max_new_tokens=20, block_length="auto")
    assert sum(result.stats["steps_by_block_length"].values()) == result.stats["steps"]
    with pytest.raises(TandemcError, match="block lengths 0, 1, 2, 3, not 4"):
        artifact.generate(prompts, max_new_tokens=4, block_length=4)
    with pytest.raises(TandemcError, match="generate graph runs block length 2 only"):
        artifact.generate(prompts, max_new_tokens=4, block_length=1, use_generate_graph=True)


def test_reference_follows_a_schedule():
    cfg, params = make(CONFIGS["gqa-4to2"], seed=1)
    prompts = [[1, 2, 3], [4, 5]]
    fixed = generate(params, cfg, prompts, block_length=2, max_new_tokens=12)
    cycled = generate(params, cfg, prompts, block_length=Cycle((1, 0, 2)), max_new_tokens=12)
    assert cycled.tokens == fixed.tokens
    assert cycled.block_lengths[:4] == [1, 0, 2, 1]


def test_vanilla_refuses_primary_steps(tmp_path):
    with pytest.raises(TandemcError, match="use 1 or more with --mode vanilla"):
        export(checkpoint("gqa-4to2"), "cpu", tmp_path / "a",
               ExportOptions(mode="vanilla", block_length=2, block_lengths=(0,), max_seq_len=(48,)))
    assert not (tmp_path / "a").exists()
