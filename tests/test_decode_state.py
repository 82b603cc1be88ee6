"""The decode steps' weights (fastvq.nn.decode_state): stacked and huge-page copies that follow
every parameter change and leave the parameters and state dicts alone."""
import pytest
import torch
import torch.nn.functional as F

from fastvq.nn.decode_state import packed_in_huge_pages


def test_stacked_qkv_follows_weight_changes():
    """SlidingWindowSelfAttention.forward_cached runs query/key/value as one product on a stacked
    copy of their weights: loading new weights must refresh it."""
    from fastvq.nn.attention import SlidingWindowSelfAttention

    torch.manual_seed(0)
    attn = SlidingWindowSelfAttention(32, 4, window=8).eval()
    other = SlidingWindowSelfAttention(32, 4, window=8).eval()
    x = torch.randn(2, 1, 32)

    def step(module):
        k, v = module.new_cache(2)
        with torch.no_grad():
            return module.forward_cached(x, k, v, 0)

    first = step(attn)
    attn.load_state_dict(other.state_dict())  # in-place copies into the same tensors
    torch.testing.assert_close(step(attn), step(other), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, step(attn))
    with torch.no_grad():
        attn.value.bias.add_(1.0)
    torch.testing.assert_close(step(attn), step(other) + F.linear(torch.ones(32), attn.proj.weight),
                               rtol=1e-5, atol=1e-5)


def test_huge_page_copies_are_exact_and_aligned():
    a, b = torch.randn(700, 1024), torch.randn(3, 5)  # a spans more than one 2 MiB page
    ca, cb = packed_in_huge_pages(a, b)
    assert torch.equal(ca, a) and torch.equal(cb, b) and ca.is_contiguous() and cb.is_contiguous()
    assert ca.data_ptr() % (2 << 20) == 0 and cb.data_ptr() == ca.data_ptr() + a.nbytes  # one buffer, end to end
    a.add_(1.0)
    assert not torch.equal(ca, a)  # copies, not views


def test_gpt_decode_copies_follow_weight_changes_and_leave_parameters_alone():
    """GPT.step reads huge-page copies of the Linear weights: loading new weights must refresh
    them, and the model's parameters and state_dict stay the ones torch allocated."""
    from fastvq.models.gpt import GPT

    torch.manual_seed(0)
    model, other = GPT(50, 16, n_layer=2, n_head=2, n_embd=32).eval(), GPT(50, 16, n_layer=2, n_head=2, n_embd=32).eval()
    params = {name: p.data_ptr() for name, p in model.named_parameters()}
    idx = torch.randint(0, 50, (2, 1))

    def step(m):
        with torch.no_grad():
            return m.step(idx, m.new_cache(2), 0)

    first = step(model)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == params
    assert all(not k.startswith("_decode") for k in model.state_dict())
    model.load_state_dict(other.state_dict())  # in-place copies into the same tensors
    torch.testing.assert_close(step(model), step(other), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, step(model))
    with torch.no_grad():
        model.blocks[1].mlp[2].weight.mul_(2.0)
        model.head.weight.mul_(-1.0)
    with torch.no_grad():
        want = model(idx)[0]
    torch.testing.assert_close(step(model), want, rtol=1e-5, atol=1e-5)


def test_parameter_slots_see_a_replaced_parameter_and_pickle_without_their_list():
    import pickle

    from fastvq.nn.decode_state import DecodeWeights, ParameterSlots

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False))
    slots = ParameterSlots(model)
    assert [p.data_ptr() for p in slots()] == [p.data_ptr() for p in model.parameters()]
    builds = []
    weights = DecodeWeights(slots, lambda: builds.append(1) or model[1].weight.clone())
    weights.get(), weights.get()
    assert len(builds) == 1  # nothing changed: no rebuild
    model[1].weight = torch.nn.Parameter(torch.ones(2, 4))  # a new tensor in the slot
    assert torch.equal(weights.get(), torch.ones(2, 4)) and len(builds) == 2
    with torch.no_grad():
        model[0].weight.add_(1)  # in place: its version counter moves
    weights.get()
    assert len(builds) == 3
    clone = pickle.loads(pickle.dumps(model))
    assert clone is not None and pickle.loads(pickle.dumps(slots))._slots is None


def _sliding():
    from fastvq.nn.attention import SlidingWindowSelfAttention

    return SlidingWindowSelfAttention(32, 4, window=8)


def _raster():
    from fastvq.nn.raster_attention import RasterWindowSelfAttention

    return RasterWindowSelfAttention(32, 4, rows=1, left=1, right=1, n_kv_head=2)


@pytest.mark.parametrize("make", [_sliding, _raster], ids=["sliding", "raster"])
def test_attention_decode_weights_are_the_stacked_parameters_of_their_own_module(make):
    """Both attention modules build their decode copies with decode_state.attention_decode_weights;
    a deep copy (or a pickled one) builds from its own parameters, not the original's."""
    import copy
    import pickle

    torch.manual_seed(0)
    m = make()

    def stacked(module):
        return (torch.cat((module.query.weight, module.key.weight, module.value.weight)),
                torch.cat((module.query.bias, module.key.bias, module.value.bias)), module.proj.weight, module.proj.bias)

    assert all(torch.equal(a, b) for a, b in zip(m.decode_weights(), stacked(m)))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        with torch.no_grad():
            clone.key.weight.add_(1.0)
            clone.proj.bias.sub_(1.0)
        assert all(torch.equal(a, b) for a, b in zip(clone.decode_weights(), stacked(clone)))
        assert all(torch.equal(a, b) for a, b in zip(m.decode_weights(), stacked(m)))  # the original's unchanged
