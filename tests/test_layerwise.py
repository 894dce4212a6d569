"""The decoder-layer runner shared by GPTQ and AWQ."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval_quant.errors import QuantArgError  # noqa: E402
from lm_eval_quant.methods.layerwise import (  # noqa: E402
    LAYER_PATHS,
    capture_layer_inputs,
    find_decoder_layers,
    run_layerwise,
)


def tiny(arch: str, layers: int = 3):
    import transformers

    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        m = transformers.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        m = transformers.GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = transformers.OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=48, num_hidden_layers=layers,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
        m = transformers.OPTForCausalLM(cfg)
    return m.eval()


def final_norm(model):
    if hasattr(model, "transformer"):
        return model.transformer.ln_f
    if hasattr(model.model, "decoder"):
        return model.model.decoder.final_layer_norm
    return model.model.norm


@pytest.mark.parametrize("arch,path", [("llama", "model.layers"), ("gpt2", "transformer.h"), ("opt", "model.decoder.layers")])
def test_find_layers(arch, path):
    p, layers = find_decoder_layers(tiny(arch))
    assert p == path and len(layers) == 3


def test_find_layers_error_names_attributes():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks_here = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(QuantArgError) as e:
        find_decoder_layers(Weird())
    msg = str(e.value)
    assert "\n" not in msg and "Weird" in msg and "model.layers" in msg and "transformer.h" in msg
    assert all(p in msg for p in LAYER_PATHS)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_noop_callback_reproduces_hidden_states(arch):
    """With an identity callback, layer i's inputs are exactly the model's hidden_states[i]."""
    m = tiny(arch)
    ids = torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hs = m(ids, output_hidden_states=True).hidden_states
    seen, outs = [], []

    def cb(step):
        seen.append(torch.cat([h.clone() for h in step.inputs]))
        outs.append(torch.cat(step.forward(collect=True)))

    run_layerwise(m, ids, cb, batch_size=2, progress=False)  # 5 samples: batches of 2, 2, 1
    assert len(seen) == 3
    for i in range(3):
        torch.testing.assert_close(seen[i], hs[i], rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(final_norm(m)(outs[-1]), hs[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_next_layer_sees_outputs_of_modified_layer(arch):
    """A callback that changes weights: the next layer's inputs come from the changed layer."""
    m = tiny(arch)
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(2))
    seen = []

    def cb(step):
        seen.append(torch.cat([h.clone() for h in step.inputs]))
        with torch.no_grad():
            for _, mod in step.linears():
                mod.weight.mul_(0.5).add_(0.01)

    run_layerwise(m, ids, cb, batch_size=3, progress=False)
    with torch.no_grad():
        hs = m(ids, output_hidden_states=True).hidden_states  # the modified model
    for i in range(3):
        torch.testing.assert_close(seen[i], hs[i], rtol=0, atol=1e-5)


def test_linear_groups_follow_call_order_and_shared_inputs():
    groups = {}

    def cb(step):
        groups[step.index] = [[n.split(".", 3)[-1] for n, _ in g] for g in step.linear_groups()]

    run_layerwise(tiny("llama", 1), torch.randint(0, 97, (2, 8)), cb, progress=False)
    assert groups[0] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                         ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]

    def cb2(step):
        groups["gpt2"] = [[n.split(".", 3)[-1] for n, _ in g] for g in step.linear_groups()]
        groups["skip"] = [[n.split(".", 3)[-1] for n, _ in g] for g in step.linear_groups(skip=("*c_fc",))]

    run_layerwise(tiny("gpt2", 1), torch.randint(0, 97, (2, 8)), cb2, progress=False)
    assert groups["gpt2"] == [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]
    assert groups["skip"] == [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_proj"]]


def test_stop_after_skips_the_rest_of_the_layer():
    calls = {"q": 0, "down": 0}

    def cb(step):
        layer = step.layer
        h1 = layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.__setitem__("q", calls["q"] + 1))
        h2 = layer.mlp.down_proj.register_forward_hook(lambda *a: calls.__setitem__("down", calls["down"] + 1))
        step.forward(stop_after=[layer.self_attn.k_proj, layer.self_attn.q_proj])
        assert calls == {"q": len(step.inputs), "down": 0}
        step.forward()
        assert calls == {"q": 2 * len(step.inputs), "down": len(step.inputs)}
        h1.remove(), h2.remove()

    run_layerwise(tiny("llama", 1), torch.randint(0, 97, (5, 8)), cb, batch_size=2, progress=False)
    assert calls["q"] == 6


def test_capture_shares_identical_kwargs_and_keeps_dtype():
    m = tiny("llama").to(torch.bfloat16)
    cap = capture_layer_inputs(m, torch.randint(0, 97, (6, 8)), batch_size=2)
    assert len(cap.hidden) == 3 and cap.nsamples == 6
    assert all(h.dtype == torch.bfloat16 for h in cap.hidden)
    assert cap.kwargs[0] is cap.kwargs[1] is cap.kwargs[2]  # one rotary table / mask, not one per batch
    assert "position_embeddings" in cap.kwargs[0]
    assert m.config.use_cache is True  # restored


def test_layers_moved_to_device_and_back(monkeypatch):
    m = tiny("llama", 2)
    moves = []
    orig = nn.Module.to

    def spy(self, *a, **k):
        if self in list(m.model.layers):
            moves.append(a[0] if a else k.get("device"))
        return orig(self, *a, **k)

    monkeypatch.setattr(nn.Module, "to", spy)
    run_layerwise(m, torch.randint(0, 97, (2, 8)), lambda s: None, device="cpu", progress=False)
    assert moves == []  # already on the compute device: nothing moved


def test_memoize_reuses_submodule_outputs_and_matches():
    """A memoized sub-module runs once per batch; later passes and the final outputs reuse it."""
    m = tiny("llama", 2)
    ids = torch.randint(0, 97, (5, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(ids, output_hidden_states=True).hidden_states
    counts = {"attn": 0}
    seen = []

    def cb(step):
        seen.append(torch.cat([h.clone() for h in step.inputs]))
        h = step.layer.self_attn.q_proj.register_forward_hook(lambda *a: counts.__setitem__("attn", counts["attn"] + 1))
        step.memoize(step.layer.self_attn)
        a = step.forward(collect=True)
        b = step.forward(collect=True)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        h.remove()
        assert "forward" not in step.layer.self_attn.__dict__  # patch removed after each pass

    run_layerwise(m, ids, cb, batch_size=2, progress=False)
    assert counts["attn"] == 2 * 3  # 2 layers x 3 batches: computed once, reused on the 2nd pass
    torch.testing.assert_close(seen[1], ref[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_micro_batch_same_outputs_and_chunks_reported(arch):
    """micro_batch: a batch runs in chunks (hooks see them, LayerStep.chunk says which rows,
    on_batch_end fires once per batch) and the layer outputs are the same as without it."""
    ids = torch.randint(0, 97, (7, 12), generator=torch.Generator().manual_seed(5))

    def run(mb):
        m = tiny(arch, 2)
        seen, chunks, ends = [], [], []

        def cb(step):
            seen.append(torch.cat([h.clone() for h in step.inputs]))
            lin = step.linears()[0][1]
            h = lin.register_forward_pre_hook(lambda mod, a: chunks.append((step.chunk, a[0].shape[0])))
            step.forward(on_batch_end=ends.append)
            h.remove()
            assert step.chunk == (-1, 0, 0, 0)
            outs = step.forward(collect=True)
            assert [o.shape[0] for o in outs] == [h.shape[0] for h in step.inputs]
            for _, mod in step.linears():  # change the layer: the next layer sees the changed outputs
                with torch.no_grad():
                    mod.weight.mul_(0.9)

        run_layerwise(m, ids, cb, batch_size=3, micro_batch=mb, progress=False)  # batches 3, 3, 1
        return seen, chunks, ends

    ref, ref_chunks, ref_ends = run(None)
    got, chunks, ends = run(2)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert ref_ends == ends == [0, 1, 2, 0, 1, 2]
    assert ref_chunks[:3] == [((0, 0, 3, 3), 3), ((1, 0, 3, 3), 3), ((2, 0, 1, 1), 1)]
    assert chunks[:5] == [((0, 0, 2, 3), 2), ((0, 2, 3, 3), 1), ((1, 0, 2, 3), 2), ((1, 2, 3, 3), 1),
                          ((2, 0, 1, 1), 1)]


def test_micro_batch_with_memoize_matches():
    m1, m2 = tiny("llama", 2), tiny("llama", 2)
    ids = torch.randint(0, 97, (5, 8), generator=torch.Generator().manual_seed(6))
    res = {}
    for key, m, mb in (("whole", m1, None), ("chunked", m2, 2)):
        outs = []

        def cb(step, outs=outs):
            step.memoize(step.layer.self_attn)
            a = step.forward(collect=True)
            b = step.forward(collect=True)
            for x, y in zip(a, b):
                assert torch.equal(x, y)
            outs.append(torch.cat(a))

        run_layerwise(m, ids, cb, batch_size=4, micro_batch=mb, progress=False)
        res[key] = outs
    for a, b in zip(res["whole"], res["chunked"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
