"""Speculative sampling draws from the primary's distribution; the sampling primitives are what they claim."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import CONFIGS, make
from tandemc import model
from tandemc.decoding import accept_greedy, accept_sampled, generate
from tandemc.sampling import Sampling, draft_token, sample, token_distribution, uniforms

ALPHA = 1e-3  # significance level of the goodness-of-fit tests
SAMPLES = 6000
NEW = 3


def primary_sequence_distribution(params, cfg, prompt, sampling):
    """Exact probability of every continuation of NEW tokens under the primary (enumerated)."""
    vocab = cfg.primary.vocab_size
    conts = np.array(list(itertools.product(range(vocab), repeat=NEW)), np.int32)
    seqs = np.concatenate([np.tile(prompt, (len(conts), 1)), conts], axis=1)
    logits, _ = jax.jit(model.forward, static_argnums=1)(params["primary"], cfg.primary, seqs)
    probs = np.asarray(token_distribution(logits, sampling))
    n = len(prompt)
    p = np.ones(len(conts))
    for i in range(NEW):
        p *= probs[np.arange(len(conts)), n - 1 + i, conts[:, i]]
    return {tuple(c): q for c, q in zip(conts.tolist(), p)}


def goodness_of_fit(samples, expected):
    """Chi-square p-value of the observed continuations against `expected`, cells with expected count < 5 merged.
    Also returns how many samples fell in cells the expected distribution says are impossible."""
    observed = {}
    for row in samples:
        observed[tuple(row)] = observed.get(tuple(row), 0) + 1
    impossible = sum(n for cell, n in observed.items() if expected.get(cell, 0.0) == 0.0)
    big = [c for c, q in expected.items() if q * len(samples) >= 5]
    small = [c for c, q in expected.items() if 0 < q * len(samples) < 5]
    obs = [observed.get(c, 0) for c in big]
    exp = [expected[c] * len(samples) for c in big]
    if small:
        obs.append(sum(observed.get(c, 0) for c in small))
        exp.append(sum(expected[c] for c in small) * len(samples))
    obs, exp = np.array(obs, float), np.array(exp, float)
    exp *= obs.sum() / exp.sum()
    return stats.chisquare(obs, exp).pvalue, impossible


@pytest.mark.parametrize("temperature, top_k, top_p", [pytest.param(1.0, 0, 1.0, marks=pytest.mark.slow), (0.8, 3, 0.9)])
def test_speed_sampling_matches_primary_distribution(temperature, top_k, top_p):
    cfg, params = make(CONFIGS["mha-odd-heads"], seed=4)
    prompt = [1, 3, 0]
    sampling = Sampling.make(temperature, top_k, top_p)
    expected = primary_sequence_distribution(params, cfg, prompt, sampling)
    kw = dict(max_new_tokens=NEW, temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    prompts = [prompt] * SAMPLES  # every row draws its own uniforms: SAMPLES independent samples

    speed = generate(params, cfg, prompts, mode="speed", block_length=2, **kw)
    assert 0.05 < speed.stats["acceptance_rate"] < 0.95  # both acceptance and rejection happen
    p_value, impossible = goodness_of_fit(speed.tokens, expected)
    assert impossible == 0
    assert p_value > ALPHA

    # The same test has the power to reject a sampler that is not the primary's: standalone Tandem keeps the
    # secondary's drafts.
    tandem = generate(params, cfg, prompts, mode="tandem", block_length=2, **kw)
    assert goodness_of_fit(tandem.tokens, expected)[0] < ALPHA


@pytest.mark.parametrize("name, prompt, mode", [("gqa-4to2", [2, 2, 5, 1], "vanilla"),
                                                ("draft-vocab", [7, 2, 8], "vanilla"), ("draft-vocab", [7, 2, 8], "speed"),
                                                ("shared-table", [7, 2, 8], "speed")])
def test_drafted_sampling_matches_primary_distribution(name, prompt, mode):
    """Exact whoever drafts, including drafters that propose only part of the vocabulary (draft-vocab: 5 of 9
    tokens; the prompt's 7 and 8 are outside it): a draft only proposes, the primary's distribution decides."""
    cfg, params = make(CONFIGS[name], seed=2)
    expected = primary_sequence_distribution(params, cfg, prompt, Sampling.make(1.0))
    out = generate(params, cfg, [prompt] * SAMPLES, mode=mode, block_length=3, max_new_tokens=NEW,
                   temperature=1.0, seed=5)
    assert 0.05 < out.stats["acceptance_rate"] < 0.95
    p_value, impossible = goodness_of_fit(out.tokens, expected)
    assert impossible == 0 and p_value > ALPHA


def test_sampling_is_reproducible_from_the_seed():
    cfg, params = make(CONFIGS["gqa-4to2"])
    kw = dict(mode="speed", block_length=3, max_new_tokens=12, temperature=0.9)
    a = generate(params, cfg, [[1, 2], [3]], seed=7, **kw)
    assert a.tokens == generate(params, cfg, [[1, 2], [3]], seed=7, **kw).tokens
    assert a.tokens != generate(params, cfg, [[1, 2], [3]], seed=8, **kw).tokens


def reference_filter(logits, temperature, top_k, top_p):
    """An independent numpy implementation of temperature → top-k → top-p."""
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[:top_k] if top_k else order] = True
    p = np.exp(z - z.max()) * keep
    p /= p.sum()
    if top_p < 1:
        mass, nucleus = 0.0, np.zeros(len(z), bool)
        for i in order:
            if not keep[i] or mass >= top_p:
                break
            nucleus[i] = True
            mass += p[i]
        keep = nucleus
    out = np.exp(z - z.max()) * keep
    return out / out.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.3, 4, 1.0),
                                                       (1.0, 0, 0.6), (0.7, 5, 0.8), (1.0, 1, 1.0)])
def test_token_distribution_matches_reference(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 20)).astype(np.float32) * 2
    got = np.asarray(token_distribution(jnp.asarray(logits), Sampling.make(temperature, top_k, top_p)))
    for row, l in zip(got, logits):
        np.testing.assert_allclose(row, reference_filter(l.astype(np.float64), temperature, top_k, top_p),
                                   atol=1e-6)


def test_temperature_zero_is_one_hot_argmax():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.9]])
    np.testing.assert_array_equal(np.asarray(token_distribution(logits, Sampling.make(0.0))), [[0, 1, 0, 0]])
    # Inverse-CDF sampling from a one-hot picks its token for every u in [0, 1).
    probs = jnp.asarray([[0.0, 1.0, 0.0, 0.0]] * 4)
    assert np.asarray(sample(probs, jnp.asarray([0.0, 0.3, 0.999, 1 - 2 ** -24]))).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("accept_all", [False, True])
def test_greedy_verification_is_rejection_sampling_with_one_hots(accept_all):
    """The greedy branch (argmaxes only) decides exactly what rejection sampling decides with one-hot
    distributions: the same accepted count and final token for drafts that match, miss, tie or stop early."""
    rng = np.random.default_rng(0)
    b, gamma, vocab = 64, 4, 5
    logits = rng.integers(-2, 3, (b, gamma + 1, vocab)).astype(np.float32)  # small integers: ties happen
    best = logits.argmax(-1)
    d = np.where(rng.random((b, gamma)) < 0.6, best[:, :gamma], rng.integers(0, vocab, (b, gamma))).astype(np.int32)
    proposed = np.arange(gamma)[None] < rng.integers(0, gamma + 1, (b, 1))
    u = rng.random((b, 2 * gamma + 1)).astype(np.float32)
    greedy = Sampling.make(0.0)
    drafted, q = draft_token(jnp.asarray(logits[:, 0]), greedy, jnp.asarray(u[:, 0]))
    np.testing.assert_array_equal(drafted, best[:, 0])
    assert not np.asarray(q).any()
    one_hot = np.eye(vocab, dtype=np.float32)[d]
    args = [jnp.asarray(x) for x in (logits, d)]
    a_ref, y_ref = accept_sampled(*args, jnp.asarray(one_hot), jnp.asarray(proposed), jnp.asarray(u), greedy,
                                  accept_all=accept_all)
    a, y = accept_greedy(*args, jnp.zeros_like(one_hot), jnp.asarray(proposed), jnp.asarray(u), greedy,
                         accept_all=accept_all)  # greedy drafts come with zeros (draft_token), never read
    np.testing.assert_array_equal(a, a_ref)
    np.testing.assert_array_equal(y, y_ref)
    rejected = int((np.asarray(a) < np.asarray(proposed).sum(1)).sum())
    assert rejected == 0 if accept_all else 0 < rejected < b  # both rejections and full acceptances occur


def test_inverse_cdf_sampling_frequencies():
    probs = np.array([0.1, 0.0, 0.6, 0.3], np.float32)
    u = (np.arange(10000) + 0.5) / 10000
    counts = np.bincount(np.asarray(sample(jnp.tile(probs, (10000, 1)), jnp.asarray(u, jnp.float32))), minlength=4)
    np.testing.assert_allclose(counts / 10000, probs, atol=1e-3)


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) % 2 ** 64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2 ** 64
    return x ^ (x >> 31)


def test_uniform_stream_follows_its_documented_definition():
    """Pure-Python integers, as another runtime would write it, against the vectorised numpy version."""
    got = uniforms(seed=1234, call=5, rows=3, width=4)
    for r in range(3):
        for w in range(4):
            h = _splitmix64(_splitmix64(_splitmix64(_splitmix64(1234) ^ 5) ^ r) ^ w)
            assert got[r, w] == np.float32((h >> 40) / 2 ** 24)
    assert got.dtype == np.float32 and ((got >= 0) & (got < 1)).all()
    assert len(np.unique(uniforms(0, 0, 1000, 1))) > 990


# --- decision margins: how verify tells a near-tie from a wrong artifact ----------------------------------------

def test_sample_and_filter_margins_measure_the_distance_to_another_decision():
    from tandemc.sampling import filter_margin, sample_margin

    probs = jnp.asarray([[0.1, 0.2, 0.3, 0.4]] * 3)
    u = jnp.asarray([0.29, 0.35, 0.9])  # CDF edges at 0.1, 0.3, 0.6, 1.0
    np.testing.assert_allclose(np.asarray(sample_margin(probs, u)), [0.01, 0.05, 0.1], atol=1e-6)
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    # top-k 2: log-probability gap between the 2nd and 3rd tokens; top-p 0.79: the nucleus mass 0.8 is 0.01 away
    np.testing.assert_allclose(np.asarray(filter_margin(logits, Sampling.make(1.0, 2, 1.0))), [np.log(2.0)], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(filter_margin(logits, Sampling.make(1.0, 0, 0.79))), [0.01], atol=1e-5)
    assert np.isinf(np.asarray(filter_margin(logits, Sampling.make(1.0, 0, 1.0)))).all()


def test_divergences_map_to_the_decision_that_produced_them():
    from tandemc.verify import decision_of_token, sampled_divergence, token_position, top_two_gap

    accepted = [2, 0, 1]  # steps emit 3, 1 and 2 tokens after the prefill's first
    assert [decision_of_token(i, accepted) for i in range(8)] == [0, 1, 1, 1, 2, 3, 3, 4]
    # greedy: a token is the argmax of its call's primary logit row at its place among the call's tokens
    assert [token_position(i, accepted) for i in range(7)] == [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0), (3, 0),
                                                               (3, 1)]
    assert top_two_gap(np.array([0.5, 3.0, 2.75, -1.0])) == 0.25
    margins = [0.5, 0.25, 1e-6, 0.125]
    assert sampled_divergence([1, 2, 3], [1, 2, 3], accepted, margins) is None
    assert sampled_divergence([1, 2, 3, 4, 9], [1, 2, 3, 4, 5], accepted, margins) == (4, 1e-6)
    assert sampled_divergence([7], [1], accepted, margins) == (0, 0.5)


def wide_vocab_tandem():
    """Vocabulary 1000: sampled decisions near a CDF edge are common enough to observe."""
    from conftest import decoder
    from tandemc.config import TandemConfig

    return make(TandemConfig(decoder(1000, 96, 2, 6, 2, 16, max_seq_len=64),
                             decoder(1000, 32, 1, 2, 1, 16, max_seq_len=64)), seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["primary", "speed"])
def test_sampled_divergences_from_rounding_sized_differences_are_near_ties(mode):
    """Two decoders whose logits differ by ε (weights × (1 + 1e-4·noise)): every sampled row where they part ways does
    so at a decision whose recorded margin is within what ε can move (2ε/T for a CDF or a filter edge, 4ε/T for an
    acceptance test), which verify excuses. A decoder with the same weights that draws other uniforms (a wrong random
    stream, as a broken lowering would) parts ways at decisions with ordinary margins, which verify reports."""
    from conftest import random_prompts
    from tandemc.verify import margin_tolerance, sampled_divergence

    cfg, params = wide_vocab_tandem()
    prompts = random_prompts(1000, [3, 5, 8, 2, 6, 4, 7, 1], seed=0)
    tokens = np.array([p + [0] * (8 - len(p)) for p in prompts])
    forward = jax.jit(model.forward, static_argnums=1)
    rng = np.random.default_rng(1)
    nearby = jax.tree.map(lambda x: x * (1 + 1e-4 * jnp.asarray(rng.standard_normal(x.shape), x.dtype)), params)
    eps = float(np.max(np.abs(forward(nearby["primary"], cfg.primary, tokens)[0] -
                              forward(params["primary"], cfg.primary, tokens)[0])))
    margins = {"nearby": [], "other stream": []}
    for seed in range(4):
        kw = dict(mode=mode, block_length=3, max_new_tokens=24, temperature=0.8, top_k=50, top_p=0.95)
        ref = generate(params, cfg, prompts, record_margins=True, seed=seed, **kw)
        for name, got in (("nearby", generate(nearby, cfg, prompts, seed=seed, **kw)),
                          ("other stream", generate(params, cfg, prompts, seed=seed + 100, **kw))):
            for row in range(len(prompts)):
                divergence = sampled_divergence(got.tokens[row], ref.tokens[row], ref.accepted[row], ref.margins[row])
                if divergence:
                    margins[name].append(divergence[1])
    bound = 2 * 4 * eps / 0.8  # twice the bound: ε was measured on the prompts, not at every decision
    assert margins["nearby"] and max(margins["nearby"]) <= bound, (margins["nearby"], bound)
    # verify's limit for an artifact whose logits differ by 1e-5, as a CPU artifact's do
    wrong, limit = margins["other stream"], margin_tolerance(1e-5, 0.8, 1000)
    assert len(wrong) >= 24 and np.mean(np.array(wrong) > limit) > 0.75, (sorted(wrong), limit)


def test_gpu_bisection_thresholds_keep_the_tokens_the_sort_keeps():
    """The gpu profile's loop-free thresholds (no sort of the vocabulary) keep exactly the reference's tokens on
    SmolLM2-sized rows, for top-k, top-p, both and neither, including ties at the k-th logit."""
    from tandemc.primitives import filter_threshold
    from tandemc.targets.onnx import threshold_by_bisection

    rng = np.random.default_rng(7)
    z = (rng.normal(size=(4, 49152)) * 3).astype(np.float32)
    z[1, :10] = z[1].max() + 1.0  # ten tied leaders
    z = jnp.asarray(z)
    bisect = jax.jit(threshold_by_bisection)
    for k, p in [(0, 1.0), (5, 1.0), (10, 1.0), (0, 0.9), (50, 0.8), (1, 0.5), (0, 0.01), (49151, 1.0),
                 (100000, 0.95)]:
        args = (z, np.int32(k), np.float32(p))
        kept_sort, kept_bisect = np.asarray(z >= filter_threshold(*args)), np.asarray(z >= bisect(*args))
        assert np.array_equal(kept_sort, kept_bisect), (k, p, kept_sort.sum(-1), kept_bisect.sum(-1))
