"""IFD / r-IFD scorer: hand cases with mock LMs through the real batched code, tokenization and
truncation with the real SmolLM2 tokenizer, and the real model on real rows."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from curate.scoring.ifd import (IFDSettings, Pair, forward_batches, make_pair, mean_nlls, pairs_for, ratios, score_rows,
                                target_nlls)
from benchmarks.ifd import reference_nll
from curate.onednn import use_onednn
from tests.conftest import shared


class _TableLM(torch.nn.Module):
    """Next-token log-probs from a table indexed by the current token (a bigram LM);
    a table with identical rows is context-free (a unigram LM)."""

    def __init__(self, logprobs: torch.Tensor):
        super().__init__()
        vocab = logprobs.shape[0]
        self.embed = torch.nn.Embedding(vocab, logprobs.shape[1])
        self.embed.weight.data.copy_(logprobs)
        self.head = torch.nn.Identity()
        self.base_model = lambda input_ids: SimpleNamespace(last_hidden_state=self.embed(input_ids))

    def get_output_embeddings(self):
        return self.head


def test_hand_case_through_the_batched_scorer():
    # tokens: 0 start, 1 prompt, 2 = a1, 3 = a2. p(a1|prompt)=.5, p(a1|start)=.25, p(a2|a1)=.25
    probs = torch.full((4, 4), 1e-9)
    probs[0] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    probs[1] = torch.tensor([0.25, 0.0, 0.5, 0.25])
    probs[2] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    lm = _TableLM(torch.log(probs.clamp_min(1e-12)))
    cond, direct = Pair([0, 1], [2, 3]), Pair([0], [2, 3])
    s_c, s_d = mean_nlls(lm, [cond, direct], batch_size=2)
    assert s_c == pytest.approx(1.039721, abs=1e-6) and s_d == pytest.approx(1.386294, abs=1e-6)
    loss, ppl = ratios(s_c, s_d)
    assert loss == pytest.approx(0.75, abs=1e-6) and ppl == pytest.approx(0.707107, abs=1e-6)


def test_the_two_definitions_rank_oppositely_and_nan_is_never_zero():
    x, y = ratios(0.5, 1.0), ratios(2.0, 3.0)
    assert x[0] < y[0] and x[1] > y[1]  # loss ratio ranks Y higher; perplexity ratio ranks X higher
    assert all(math.isnan(v) for v in ratios(math.nan, 1.0) + ratios(1.0, 0.0))


@pytest.fixture(scope="module")
def tokenizer():
    from curate.models import load_causal_lm

    return load_causal_lm()[1]


class _UnigramLM(torch.nn.Module):
    """Context-free: the same next-token distribution after any context."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logprobs = torch.log_softmax(torch.randn(vocab, generator=g), dim=0)
        self.head = torch.nn.Linear(1, vocab)
        self.head.weight.data.zero_()
        self.head.bias.data.copy_(self.logprobs)
        self.base_model = lambda input_ids: SimpleNamespace(
            last_hidden_state=torch.zeros(*input_ids.shape, 1))

    def get_output_embeddings(self):
        return self.head


def _unigram(vocab: int, seed: int = 0) -> _UnigramLM:
    return _UnigramLM(vocab, seed)


def test_context_free_lm_gives_ifd_exactly_one_and_the_compat_hand_value(tokenizer):
    lm = _unigram(len(tokenizer))
    rows = [{"instruction": "Name a prime number.", "input": "", "output": "Seven is a prime number."},
            {"instruction": "Add", "input": "2 and 3", "output": "\nThe sum is 5."}]
    for r in score_rows(lm, tokenizer, rows, IFDSettings(max_length=128)):
        assert r["ifd_loss"] == 1.0 and r["ifd_ppl"] == 1.0 and r["rifd"] == 1.0 and r["ifd_status"] == "ok"
        assert r["ifd_tokens"] == r["ifd_tokens_direct"]
    compat = score_rows(lm, tokenizer, rows, IFDSettings(max_length=128, superfiltering_compat=True))
    unigram = -lm.logprobs.double()
    for row, r in zip(rows, compat):
        ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        nll = unigram[ids].numpy()
        assert r["ifd_loss"] == pytest.approx(nll.mean() / nll[1:].mean(), rel=1e-9)
        assert r["ifd_tokens_direct"] == r["ifd_tokens"] - 1 and r["ifd_loss"] != 1.0


def test_boundary_tokens_are_the_response_tokens_in_both_branches(tokenizer):
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [{"instruction": "Continue the text", "input": "", "output": "\nnext line"},  # prompt ends "\n"
            {"instruction": "Say yes. yes", "input": "", "output": "yes"}]                 # response inside prompt
    cond, direct, rcond, rdirect = pairs_for(rows, tokenizer, IFDSettings(max_length=64))
    for row, c, d in zip(rows, cond, direct):
        assert c.target == d.target == enc(row["output"])
        assert c.prefix[-len(enc(row["instruction"] + "\n")):] == enc(row["instruction"] + "\n")
    assert rcond[1].target == rdirect[1].target == enc("Say yes. yes")


def test_truncation(tokenizer):
    lm = _unigram(len(tokenizer))
    rows = [{"instruction": "word " * 200, "input": "", "output": "short answer"},
            {"instruction": "Tell a story.", "input": "", "output": "once upon a time " * 100}]
    long_prompt, long_answer = score_rows(lm, tokenizer, rows, IFDSettings(max_length=64))
    assert long_prompt["ifd_status"] == "prompt_truncated" and math.isnan(long_prompt["ifd_loss"])
    assert math.isnan(long_prompt["ifd_nll_cond"])
    assert long_answer["ifd_status"] == "response_truncated" and long_answer["ifd_loss"] == 1.0
    assert long_answer["ifd_tokens"] == long_answer["ifd_tokens_direct"] < 64
    assert make_pair([1, 2], [], 10).status == "empty_response"


def test_sliced_vocabulary_nlls_equal_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=gen) * 3, torch.randn(1000, 16, generator=gen)
    targets = torch.tensor([0, 255, 256, 511, 999] + list(range(300, 332)))  # slice edges, last (short) slice
    want = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    for slice_elements in (1, 256 * 37 * 2, None):  # 256-row slices (4, the last short), 512-row, one slice
        got = target_nlls(hidden, weight, targets, slice_elements=slice_elements)
        assert torch.allclose(got, want, atol=1e-5), slice_elements


def test_forward_batches_bound_rows_and_padded_tokens():
    lengths = [5, 300, 40, 41, 7, 2000, 39, 8, 8, 120]
    batches = forward_batches(lengths, batch_tokens=100, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths)  # length order, ties by index
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100  # one long row always gets a batch
    assert [len(b) for b in batches] == [3, 2, 2, 1, 1, 1]


def test_tiny_real_llama_scores_equal_its_own_loss_for_any_batching():
    """A real transformers Llama (random weights, built from a config, nothing downloaded):
    right padding without a mask, the sliced projection and any batching give each row's own
    ``model(labels=...)`` loss."""
    model = _tiny_llama()
    gen = np.random.default_rng(0)
    pairs = [Pair([1] + gen.integers(2, 700, int(gen.integers(0, 9))).tolist(),
                  gen.integers(2, 700, int(gen.integers(1, 40))).tolist()) for _ in range(30)]
    want = [reference_nll(model, p) for p in pairs]  # the model's own loss, one pair a pass
    for batch_size, batch_tokens in ((1, None), (16, None), (64, 100), (8, 40)):
        got = mean_nlls(model, pairs, batch_size=batch_size, pad_id=0, batch_tokens=batch_tokens)
        assert np.allclose(got, want, atol=1e-5, rtol=0), (batch_size, batch_tokens)
    if use_onednn(model):  # the stage's CPU kernel, the projection included
        got = mean_nlls(model, pairs, batch_size=64, pad_id=0, batch_tokens=100)
        assert np.allclose(got, want, atol=1e-5, rtol=0)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=700, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    return model.eval()


def test_a_rider_is_scored_in_its_hosts_pass_with_its_own_loss():
    """Riders that start their host are scored from the host's hidden states (one pass fewer per
    rider, counted at the model's body); a rider whose host does not start with it, whose host is
    not run, or that would make a chain runs alone. Every score is the pair's own loss."""
    model = _tiny_llama()
    gen = np.random.default_rng(1)
    seq = lambda n: gen.integers(2, 700, n).tolist()  # noqa: E731
    hosts = [Pair([1] + seq(int(gen.integers(3, 12))), seq(int(gen.integers(1, 30)))) for _ in range(12)]
    riders = [Pair(h.prefix[:1], h.prefix[1:1 + int(gen.integers(1, len(h.prefix)))]) for h in hosts[:8]]
    riders[0] = Pair([1], seq(5))  # not the start of its host: alone
    hosts[1].status, hosts[1].target = "prompt_truncated", []  # host not run: alone
    riders.append(Pair(riders[2].prefix, riders[2].target[:1]))  # would ride a rider: alone
    riders.append(Pair([], hosts[3].prefix[:4], skip_first=True))  # skip_first rider (compat) rides
    pairs = hosts + riders
    n = len(hosts)
    plan = {n + k: k for k in range(8)} | {n + 8: n + 2, n + 9: 3}
    want = [reference_nll(model, p) for p in pairs]  # NaN for the host not run
    passed = []
    hook = model.model.register_forward_pre_hook(
        lambda m, args, kwargs: passed.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    for batch_size, batch_tokens in ((1, None), (16, None), (5, 60)):
        passed.clear()
        got = mean_nlls(model, pairs, batch_size=batch_size, pad_id=0, batch_tokens=batch_tokens, riders=plan)
        assert np.allclose(got, want, atol=1e-5, rtol=0, equal_nan=True), (batch_size, batch_tokens)
        assert sum(passed) == len(pairs) - 1 - 7  # hosts[1] not run; 7 riders carried (0, 1 and the chain alone)
    hook.remove()
    with pytest.raises(ValueError, match="no prefix"):
        mean_nlls(model, [Pair([], [5, 6])])


def test_a_tokenizer_without_start_token_skips_the_first_target_token(tokenizer):
    class NoStart:
        bos_token_id = eos_token_id = pad_token_id = None

        def __call__(self, text, **kw):
            return tokenizer(text, **kw)

    rows = [{"instruction": "Name a prime number.", "input": "", "output": "Seven is a prime number."}]
    cond, direct, rcond, rdirect = pairs_for(rows, NoStart(), IFDSettings(max_length=64))
    assert direct[0].prefix == rdirect[0].prefix == [] and direct[0].skip_first and rdirect[0].skip_first
    lm = _unigram(len(tokenizer))
    got = score_rows(lm, NoStart(), rows, IFDSettings(max_length=64))[0]
    assert got["ifd_status"] == "ok" and got["ifd_tokens_direct"] == got["ifd_tokens"] - 1
    assert math.isfinite(got["rifd_nll_direct"])


def test_real_model_batched_equals_one_at_a_time_and_reruns_identically():
    from curate.models import load_causal_lm

    model, tok = load_causal_lm()
    # 16 real rows, batch 8, max_length 96: small enough for a test on 2 cores (benchmarks.ifd
    # checks 400 rows at the stage's max_length against the reference loop); long reverse prompts
    # do not fit, so the prompt_truncated branch is taken too
    rows = json.load(open(shared("alpaca_cherry_5pct.json")))[:8] + json.load(open(shared("gsm8k_train.json")))[:8]
    single = score_rows(model, tok, rows, IFDSettings(max_length=96, batch_size=1))  # torch's own kernel
    use_onednn(model)  # batched on the other float32 kernel, where this torch has it
    settings = IFDSettings(max_length=96, batch_size=8)
    batched = score_rows(model, tok, rows, settings)
    again = score_rows(model, tok, rows, settings)
    for b, s, a in zip(batched, single, again):
        for key in ("ifd_nll_cond", "ifd_nll_direct", "rifd_nll_cond", "rifd_nll_direct"):
            if math.isnan(s[key]):  # only where the status says the score is undefined
                assert math.isnan(b[key]) and math.isnan(a[key])
                assert b["rifd_status" if key.startswith("rifd") else "ifd_status"] == "prompt_truncated"
            else:
                assert abs(b[key] - s[key]) < 1e-4, key
                assert b[key] == a[key]
        if b["ifd_status"] == "prompt_truncated":  # a long instruction + input leaves no room
            assert math.isnan(b["ifd_loss"])
        else:
            assert b["ifd_status"] in ("ok", "response_truncated") and 0 < b["ifd_loss"] < 3
    scored = [b["ifd_loss"] for b in batched if math.isfinite(b["ifd_loss"])]
    assert len(scored) >= 12 and np.std(scored) > 0.01  # real, varying scores
    finite = sum(math.isfinite(b["rifd"]) for b in batched)
    assert 4 <= finite < len(rows)  # scored where the reverse prompt fits, prompt_truncated elsewhere
