"""AWQ (methods/awq.py): hand-checkable pieces, function-preserving folds, and quality orderings."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval_quant.errors import QuantArgError  # noqa: E402
from lm_eval_quant.formats import make_format, quantize_weight  # noqa: E402
from lm_eval_quant.methods import awq as A  # noqa: E402
from lm_eval_quant.methods import build_config, get_method  # noqa: E402
from lm_eval_quant.methods.base import QuantConfig, QuantContext  # noqa: E402


# ------------------------------------------------------------------------------------ fixtures
def _llama(kv_heads=4, hidden=64, layers=2, inter=128, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
    return _perturb(LlamaForCausalLM(cfg).eval(), seed)


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return _perturb(GPT2LMHeadModel(cfg).eval(), seed)


def _perturb(model, seed):
    """Non-trivial norm weights/biases with a few outlier channels, so AWQ picks α > 0."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if "norm" in type(mod).__name__.lower():
                w = mod.weight
                w.copy_(1 + 0.3 * torch.randn(w.shape, generator=g))
                w[: max(1, w.numel() // 16)] *= 8.0  # outlier input channels
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
    return model


def _ids(n=8, seqlen=32, seed=0):
    return torch.randint(3, 250, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _cfg(bits=3, gs=32, fmt="int", sym=False, skip=("lm_head",)):
    return QuantConfig(method="awq", bits=bits, group_size=gs, format=fmt, sym=sym, skip=skip)


# ------------------------------------------------------------------------------ the equivalence
@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_scaling_leaves_full_precision_function_unchanged(make):
    model = make()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = A.awq_quantize_model(model, ids, _cfg(), quantize=False)
    with torch.no_grad():
        out = model(ids).logits
    # the test must be able to fail: scales were really folded (weights changed, α > 0 somewhere)
    assert any(a > 0 for a in log["alpha"].values())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("norm" in k or "ln_" in k for k in changed)
    assert set(changed) <= set(log["modified"])
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), (out - ref).abs().max()


def test_llama_folds_into_norms_and_linears():
    model = _llama()
    log = A.awq_quantize_model(model, _ids(), _cfg(), quantize=False, n_grid=20)
    keys = set(log["alpha"])
    for g in ("self_attn.q_proj+self_attn.k_proj+self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj+mlp.up_proj", "mlp.down_proj"):
        assert f"model.layers.0:{g}" in keys
    assert log["unscaled"] == []


def test_gqa_o_proj_is_not_scaled_and_function_kept():
    model = _llama(kv_heads=2)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    log = A.awq_quantize_model(model, ids, _cfg(), quantize=False)
    assert all("o_proj" not in k for k in log["alpha"])
    assert any("o_proj" in u and "no foldable producer" in u for u in log["unscaled"])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_gpt2_attention_proj_folds_into_c_attn_v_part_and_mlp_proj_does_not():
    model = _gpt2()
    log = A.awq_quantize_model(model, _ids(), _cfg(), quantize=False)
    assert "transformer.h.0:attn.c_attn" in log["alpha"]
    assert any("mlp.c_proj" in u for u in log["unscaled"])  # after GELU: not foldable


def test_a_fold_that_changes_the_function_is_reverted(monkeypatch):
    """Force the (invalid) GELU fold c_fc → mlp.c_proj: the numeric check must undo it."""
    orig = A._linear_rule

    def bad_rule(local, module, by_local):
        if local == "mlp.c_proj":
            fc = by_local["mlp.c_fc"]
            return fc, slice(0, A._in_features(module))
        return orig(local, module, by_local)

    monkeypatch.setattr(A, "_linear_rule", bad_rule)
    model = _gpt2()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    log = A.awq_quantize_model(model, ids, _cfg(), quantize=False)
    assert any("mlp.c_proj" in u and "changes the output" in u for u in log["unscaled"])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------- the search pieces
def _outlier_problem(seed=0, n=512, d=64, out=48):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X[:, :4] *= 25.0  # salient input channels
    W = torch.randn(out, d, generator=g) * 0.1
    return X, W


def test_alpha_zero_is_rtn_and_best_alpha_is_strictly_better():
    X, W = _outlier_problem()
    fmt = make_format("int", 3, False)
    H = X.t() @ X
    s, alpha, mse = A.search_scale([W], H, X.abs().mean(0), X.shape[0], fmt, 32, n_grid=20)
    rtn = quantize_weight(W, fmt, 32).w_hat
    rtn_mse = ((X @ (rtn - W).t()) ** 2).sum() / (X.shape[0] * W.shape[0])
    assert mse[0].item() == pytest.approx(rtn_mse.item(), rel=1e-4)  # α = 0: plain RTN
    assert alpha > 0
    assert mse.min().item() < 0.9 * mse[0].item()
    # the returned s reproduces the reported loss when used directly
    Wq = quantize_weight(W * s, fmt, 32).w_hat / s
    direct = ((X @ (Wq - W).t()) ** 2).sum() / (X.shape[0] * W.shape[0])
    assert direct.item() == pytest.approx(mse.min().item(), rel=1e-4)
    # normalisation: sqrt(max s * min s) == 1
    assert (s.max() * s.min()).sqrt().item() == pytest.approx(1.0, rel=1e-5)


def test_scale_candidates_hand_case():
    s = A.scale_candidates(torch.tensor([1.0, 4.0, 16.0]), torch.tensor([0.0, 0.5]))
    assert torch.allclose(s[0], torch.ones(3))
    # α=0.5: [1, 2, 4] / sqrt(4*1) = [0.5, 1, 2]
    assert torch.allclose(s[1], torch.tensor([0.5, 1.0, 2.0]))


def test_clip_search_reduces_error_and_ratio_one_is_no_clip():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 64, generator=g)
    W = torch.distributions.StudentT(2.0).sample((32, 64)) * 0.05  # heavy tails: clipping pays
    fmt = make_format("int", 3, False)
    H = X.t() @ X
    ratio, errs = A.search_clip(W, H, fmt, 32, clip_grid=20, max_shrink=0.5, return_errors=True)
    assert ratio.shape == (32, 2, 1)
    assert ratio.min().item() >= 0.5 - 1e-6 and ratio.max().item() <= 1.0
    # grid point 0 (ratio 1) is plain RTN, group by group
    e0 = (quantize_weight(W, fmt, 32).w_hat - W).reshape(32, 2, 32)
    Hb = A._diag_blocks(H, 32)
    manual = torch.einsum("ong,ngh,onh->on", e0, Hb, e0)
    assert torch.allclose(errs[0], manual, rtol=1e-4, atol=1e-6)
    Wc = A.apply_clip(W, ratio, 32)
    e1 = (quantize_weight(Wc, fmt, 32).w_hat - W).reshape(32, 2, 32)
    clipped = torch.einsum("ong,ngh,onh->on", e1, Hb, e1)
    assert torch.all(clipped <= manual * (1 + 1e-5) + 1e-7)
    assert clipped.sum().item() < 0.95 * manual.sum().item()
    assert (ratio < 1).any()


@pytest.mark.parametrize("fmt,bits,sym", [("int", 4, True), ("fp", 4, True), ("nf", 3, True), ("dynamic", 4, True)])
def test_every_format_runs_and_beats_or_equals_rtn_on_the_objective(fmt, bits, sym):
    X, W = _outlier_problem(seed=2)
    f = make_format(fmt, bits, sym)
    H = X.t() @ X
    s, alpha, mse = A.search_scale([W], H, X.abs().mean(0), X.shape[0], f, 32, n_grid=10)
    assert mse.min() <= mse[0]
    model = _llama()
    ids = _ids(4, 16)
    log = A.awq_quantize_model(model, ids, _cfg(bits, 32, fmt, sym))
    assert log["quantized"] and all(torch.isfinite(p).all() for p in model.parameters())


def test_group_size_per_channel_runs():
    model = _llama()
    log = A.awq_quantize_model(model, _ids(4, 16), _cfg(3, -1))
    assert len(log["quantized"]) == 14  # 7 linears x 2 layers; lm_head skipped


def test_block_error_of_awq_is_below_rtn_on_a_layer():
    """End to end on one model: the first layer's q/k/v output error with AWQ ≤ with RTN."""
    base = _llama(seed=3)
    ids = _ids(8, 32, seed=5)
    captured = {}

    def grab(model):
        h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a: captured.__setitem__("x", a[0].detach().clone()))
        with torch.no_grad():
            model(ids)
        h.remove()
        return captured["x"]

    x_fp = grab(base)
    W_fp = [getattr(base.model.layers[0].self_attn, n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj")]
    ref = torch.cat([x_fp @ w.t() for w in W_fp], -1)

    def err(model):
        x = grab(model)
        att = model.model.layers[0].self_attn
        y = torch.cat([x @ getattr(att, n).weight.t() for n in ("q_proj", "k_proj", "v_proj")], -1)
        return ((y - ref) ** 2).mean().item()

    rtn = copy.deepcopy(base)
    get_method("rtn").quantize(rtn, build_config(method="rtn", bits=3, group_size=32), QuantContext(progress=False))
    awq = copy.deepcopy(base)
    A.awq_quantize_model(awq, ids, _cfg(3, 32))
    noclip = copy.deepcopy(base)
    A.awq_quantize_model(noclip, ids, _cfg(3, 32), clip=False)
    assert err(awq) < err(rtn)
    assert err(noclip) < err(rtn)


class _TwoHeads(nn.Module):
    """A module whose output is the concatenation of two linears on one input."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, *, gain=1.0):
        return torch.cat([self.a(x), self.b(x)], -1) * gain


def test_module_loss_equals_closed_form_when_the_module_is_the_concatenation():
    X, W = _outlier_problem(seed=4)
    a, b = nn.Linear(64, 24, bias=False), nn.Linear(64, 24, bias=False)
    with torch.no_grad():
        a.weight.copy_(W[:24])
        b.weight.copy_(W[24:])
    mod = _TwoHeads(a, b)
    fmt = make_format("int", 3, False)
    xs = [X[:256], X[256:]]  # two "calibration batches", called with a keyword arg
    calls = [((x,), {"gain": 1.0}, mod(x).detach()) for x in xs]
    s1, a1, m1 = A.search_scale_module(mod, calls, [a, b], X.abs().mean(0), fmt, 32, n_grid=10)
    s2, a2, m2 = A.search_scale([a.weight, b.weight], X.t() @ X, X.abs().mean(0), X.shape[0], fmt, 32, n_grid=10)
    assert torch.allclose(m1.float(), m2.float(), rtol=1e-3)
    assert a1 == a2 > 0 and torch.equal(s1, s2)
    assert torch.equal(a.weight, W[:24]) and torch.equal(b.weight, W[24:])  # weights restored


def test_enclosing_module_is_the_lowest_common_ancestor():
    model = _llama()
    layer = model.model.layers[0]
    mod, name = A._enclosing_module(layer, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    assert mod is layer.self_attn and name == "self_attn"
    assert A._enclosing_module(layer, ["mlp.gate_proj", "mlp.up_proj"])[1] == "mlp"
    assert A._enclosing_module(layer, ["self_attn.o_proj"]) == (None, "")  # one linear: linear loss
    assert A._enclosing_module(layer, ["self_attn.v_proj", "mlp.up_proj"]) == (None, "")  # the layer itself


@pytest.mark.parametrize("loss", ["module", "linear"])
def test_loss_option_picks_the_search_per_group(loss):
    model = _llama()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    log = A.awq_quantize_model(model, ids, _cfg(), quantize=False, loss=loss)
    want = {"self_attn.q_proj+self_attn.k_proj+self_attn.v_proj": "module:self_attn",
            "self_attn.o_proj": "linear", "mlp.gate_proj+mlp.up_proj": "module:mlp", "mlp.down_proj": "linear"}
    for g, kind in want.items():
        assert log["loss"][f"model.layers.1:{g}"] == (kind if loss == "module" else "linear")
    assert log["loss_fallback"] == [] and any(a > 0 for a in log["alpha"].values())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_clip_qk_false_leaves_query_key_projections_unclipped():
    log = A.awq_quantize_model(_llama(), _ids(4, 16), _cfg(), clip_qk=False)
    assert sorted(n.rsplit(".", 1)[1] for n in log["clip_skipped"]) == ["k_proj"] * 2 + ["q_proj"] * 2
    assert not any("q_proj" in n or "k_proj" in n for n in log["clip_mean"])
    log = A.awq_quantize_model(_llama(), _ids(4, 16), _cfg())  # default: clipped like the others
    assert log["clip_skipped"] == [] and any("q_proj" in n for n in log["clip_mean"])


# ------------------------------------------------------------------------------ user arguments
@pytest.mark.parametrize("kw,frag", [
    (dict(n_grid="0"), "n_grid"),
    (dict(clip_grid="0"), "clip_grid"),
    (dict(max_shrink="1.5"), "max_shrink"),
    (dict(loss="block"), "loss"),
    (dict(nsamples="0"), "nsamples"),
    (dict(calib="nosuchset"), "calib"),
    (dict(calib="/nonexistent/file.jsonl"), "does not exist"),
    (dict(damp="0.1"), "gptq"),
])
def test_bad_arguments_are_one_line(kw, frag):
    with pytest.raises(QuantArgError) as ei:
        build_config(method="awq", bits="4", group_size="32", **kw)
    assert frag in str(ei.value) and "\n" not in str(ei.value)


def test_options_parse():
    cfg = build_config(method="awq", bits="3", group_size="32", n_grid="10", clip="false", seqlen="64")
    assert cfg.options["n_grid"] == 10 and cfg.options["clip"] is False and cfg.options["seqlen"] == 64
    assert cfg.options["calib"] == "auto" and cfg.options["nsamples"] == 128
    assert cfg.options["loss"] == "module" and cfg.options["clip_qk"] is True
    assert build_config(method="awq", bits="3", loss="linear").options["loss"] == "linear"


# --------------------------------------------------------------- trained models: perplexities
@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from lm_eval_quant.toy import make_corpus

    p = tmp_path_factory.mktemp("awq_calib") / "stories.txt"
    p.write_text(make_corpus(60_000, seed=7))
    return p


@pytest.fixture(scope="module")
def trained(trained_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_quant.toy import heldout_text

    path = trained_llama
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ev = torch.tensor(tok(heldout_text(20_000))["input_ids"])
    return model, tok, ev


def _ppl_after(model, tok, ev, method, bits, gs, calib_file, skip="lm_head", **opts):
    from lm_eval_quant.ppl import perplexity

    m = copy.deepcopy(model)
    if method != "none":
        if method == "awq":
            opts = dict(calib=str(calib_file), nsamples=32, seqlen=128, **opts)
        cfg = build_config(method=method, bits=bits, group_size=gs, skip=skip, **opts)
        get_method(method).quantize(m, cfg, QuantContext(tokenizer=tok, progress=False))
    return perplexity(m, ev, 128), m


@pytest.mark.parametrize("gs", [-1, 32])
def test_trained_fixture_awq_4_bits_close_to_fp(trained, calib_file, gs):
    model, tok, ev = trained
    fp, _ = _ppl_after(model, tok, ev, "none", 16, gs, calib_file)
    awq4, _ = _ppl_after(model, tok, ev, "awq", 4, gs, calib_file)
    assert awq4 < fp * 1.02, (fp, awq4)


@pytest.fixture(scope="module")
def sensitive(sensitive_llama):
    """trained_llama with 4 outlier hidden channels folded in (conftest.sensitive_llama)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_quant.toy import heldout_text

    tok = AutoTokenizer.from_pretrained(sensitive_llama)
    model = AutoModelForCausalLM.from_pretrained(sensitive_llama).eval()
    ev = torch.tensor(tok(heldout_text(20_000))["input_ids"])
    return model, tok, ev


@pytest.mark.parametrize("gs", [-1, 32])
def test_trained_fixture_awq_beats_rtn_at_3_bits(sensitive, calib_file, gs):
    """On the quantization-sensitive trained fixture (outlier channels, as in real LLMs).

    History: on the plain trained_llama (no outliers) 3-bit g32 RTN costs only +0.5% perplexity
    (fp 2.0354 -> RTN 2.0459) and AWQ was slightly worse (module 2.0585, linear 2.0586; g-1 RTN
    2.0512, AWQ 2.0545 / 2.0629). No AWQ bug was found: the fold is exact, AWQ lowers the held-out
    output MSE of 13/14 linears by 5-47%, but at that error level perplexity follows the error's
    direction, not its size (RTN with random per-channel scales exp(0.02 N) spans 2.0456..2.0492).
    """
    model, tok, ev = sensitive
    fp, _ = _ppl_after(model, tok, ev, "none", 16, gs, calib_file)
    rtn3, _ = _ppl_after(model, tok, ev, "rtn", 3, gs, calib_file)
    awq3, _ = _ppl_after(model, tok, ev, "awq", 3, gs, calib_file)
    rtn4, _ = _ppl_after(model, tok, ev, "rtn", 4, gs, calib_file)
    awq4, _ = _ppl_after(model, tok, ev, "awq", 4, gs, calib_file)
    # measured 2026-11-30 (loss=module default; loss=linear in brackets): fp 2.0354;
    # g-1: rtn3 2.1351 (+4.9%) awq3 2.0582 [2.0555], rtn4 2.0934 awq4 2.0403 [2.0373];
    # g32: rtn3 2.1294 (+4.6%) awq3 2.0643 [2.0629], rtn4 2.0824 awq4 2.0405 [2.0392]
    assert rtn3 > fp * 1.03, (fp, rtn3)  # the fixture really is sensitive
    assert awq3 < 0.985 * rtn3, (fp, rtn3, awq3)
    assert awq4 < rtn4, (fp, rtn4, awq4)
    assert awq4 < fp * 1.02, (fp, awq4)


def test_awq_is_deterministic(trained, calib_file):
    model, tok, ev = trained
    _, m1 = _ppl_after(model, tok, ev, "awq", 3, 32, calib_file)
    _, m2 = _ppl_after(model, tok, ev, "awq", 3, 32, calib_file)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_report_lists_exactly_the_changed_parameters(trained, calib_file):
    model, tok, _ = trained
    m = copy.deepcopy(model)
    cfg = build_config(method="awq", bits=3, group_size=32, calib=str(calib_file), nsamples=8, seqlen=64)
    rep = get_method("awq").quantize(m, cfg, QuantContext(tokenizer=tok, progress=False))
    before = model.state_dict()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= set(rep.modified)
    assert any("layernorm" in k for k in changed)
    assert rep.extra["calibration"]["nsamples"] == 8 and rep.extra["awq"]["alpha"]


@pytest.mark.slow  # issue 10: real model (stories260K from ../shared); the toy fixtures cover this fast
@pytest.mark.parametrize("gs,skip,margin", [(-1, "lm_head", 1.12), (32, "lm_head|down_proj", 1.06)])
def test_stories260k_awq_beats_rtn_at_3_and_4_bits(stories260k, calib_file, gs, skip, margin):
    """stories260K (intermediate 172: group 32 needs down_proj left in full precision)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_quant.toy import heldout_text

    path = stories260k
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ev = torch.tensor(tok(heldout_text(20_000))["input_ids"])
    fp, _ = _ppl_after(model, tok, ev, "none", 16, gs, calib_file)
    rtn3, _ = _ppl_after(model, tok, ev, "rtn", 3, gs, calib_file, skip=skip)
    awq3, _ = _ppl_after(model, tok, ev, "awq", 3, gs, calib_file, skip=skip)
    awq4, _ = _ppl_after(model, tok, ev, "awq", 4, gs, calib_file, skip=skip)
    rtn4, _ = _ppl_after(model, tok, ev, "rtn", 4, gs, calib_file, skip=skip)
    # measured 2026-11-30 (loss=module default; loss=linear in brackets): fp 3.793; g-1: rtn3 7.62
    # awq3 6.42 [5.96], rtn4 4.14 awq4 3.92 [4.11]; g32 (down_proj fp): rtn3 5.01 awq3 4.83 [4.57],
    # rtn4 4.05 awq4 3.87 [3.87]
    assert awq3 < rtn3, (fp, rtn3, awq3)
    assert awq4 < rtn4, (fp, rtn4, awq4)
    assert awq4 < fp * margin, (fp, awq4)
