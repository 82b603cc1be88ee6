"""VQGANLoss and NLayerDiscriminator against taming-transformers' classes (same state dicts, same
numbers), the adaptive weight by hand, and the fixes: no λ and no discriminator before disc_start."""
import sys
import types

import pytest
import torch
from torch import nn

from fastvq.models.discriminator import ActNorm, NLayerDiscriminator
from fastvq.models.lpips import LPIPS
from fastvq.models.vqgan_loss import VQGANLoss, hinge_d_loss, vanilla_d_loss
from helpers import assert_close

taming_disc = pytest.importorskip("taming.modules.discriminator.model")

NDF, LAYERS = 8, 2  # tiny discriminators on 32x32 images


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def metric():
    return LPIPS(fallback=True)  # the perceptual term is shared by both sides of every comparison


@pytest.fixture(scope="module")
def taming_loss_class(metric):
    """taming's VQLPIPSWithDiscriminator with its LPIPS module stubbed out (the real one imports
    torchvision and downloads VGG); everything else in the module is taming's own code."""

    class StubLPIPS(nn.Module):
        def __init__(self):
            super().__init__()
            self.forward = metric.forward  # no submodule, so no extra state-dict entries

    stub = types.ModuleType("taming.modules.losses.lpips")
    stub.LPIPS = StubLPIPS
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "taming.modules.losses.lpips", stub)
        for name in ("taming.modules.losses", "taming.modules.losses.vqperceptual"):
            mp.delitem(sys.modules, name, raising=False)
        from taming.modules.losses.vqperceptual import VQLPIPSWithDiscriminator
    return VQLPIPSWithDiscriminator


def images(seed, n=2, size=32, channels=3):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(z)


def generator_batch(seed=0):
    torch.manual_seed(seed)
    decoder = TinyDecoder()
    z = images(seed + 1, channels=4)
    x = images(seed + 2)
    codebook_loss = torch.tensor(0.3, requires_grad=True)
    return decoder, z, x, codebook_loss


def make_loss(metric, **kwargs):
    kwargs = {"disc_start": 0, "disc_ndf": NDF, "disc_num_layers": LAYERS, **kwargs}
    return VQGANLoss(perceptual=metric, **kwargs)


# ----------------------------------------------------------------------------- discriminator

@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("use_actnorm", [False, True])
def test_discriminator_loads_taming_state_and_matches(n_layers, use_actnorm):
    torch.manual_seed(n_layers)
    theirs = taming_disc.NLayerDiscriminator(input_nc=3, ndf=NDF, n_layers=n_layers, use_actnorm=use_actnorm)
    theirs.apply(taming_disc.weights_init)
    ours = NLayerDiscriminator(input_nc=3, ndf=NDF, n_layers=n_layers, use_actnorm=use_actnorm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = images(n_layers)
    for training in (True, False):  # BatchNorm batch statistics / ActNorm's data init, then eval
        ours.train(training), theirs.train(training)
        assert_close(ours(x), theirs(x))
    assert_close(ours.state_dict(), theirs.state_dict())  # same running stats / ActNorm init


def test_actnorm_initialises_from_first_training_batch():
    norm = ActNorm(3)
    x = images(0, n=4) * 3 + 1
    y = norm(x)
    assert norm.initialized.item() == 1
    assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert_close(y.transpose(0, 1).reshape(3, -1).std(1), torch.ones(3), atol=1e-4, rtol=0)
    assert_close(norm(x * 2), 2 * y - norm.scale * norm.loc)  # frozen after the first batch


def test_discriminator_initialisation_and_errors():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=64, n_layers=3)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert abs(torch.cat([c.weight.flatten() for c in convs]).std().item() - 0.02) < 1e-3
    assert all(c.bias is None for c in convs[1:-1]) and all((n.bias == 0).all() for n in norms)
    assert abs(torch.cat([n.weight for n in norms]).mean().item() - 1.0) < 0.01
    assert disc(images(0)).shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="n_layers must be an integer >= 1"):
        NLayerDiscriminator(n_layers=0)


# ----------------------------------------------------------------------------- against taming

@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
@pytest.mark.parametrize("global_step", [0, 3])
def test_matches_taming(taming_loss_class, metric, disc_loss, global_step):
    kwargs = dict(disc_start=2, codebook_weight=0.7, disc_num_layers=LAYERS, disc_factor=0.9, disc_weight=0.6,
                  perceptual_weight=1.3, disc_ndf=NDF, disc_loss=disc_loss)
    torch.manual_seed(0)
    theirs = taming_loss_class(**kwargs)
    ours = VQGANLoss(perceptual=metric, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # what taming's "loss.*" entries hold

    decoder, z, x, codebook_loss = generator_batch()
    results = []
    for loss_module in (theirs, ours):
        xrec = decoder(z)
        loss, log = loss_module(codebook_loss, x, xrec, 0, global_step, last_layer=decoder.conv_out.weight)
        grad, = torch.autograd.grad(loss, decoder.conv_out.weight)
        d_loss, d_log = loss_module(codebook_loss, x, xrec, 1, global_step)
        results.append((loss, log, grad, d_loss, d_log))
    (loss_t, log_t, grad_t, d_t, dlog_t), (loss_o, log_o, grad_o, d_o, dlog_o) = results
    assert_close(loss_o, loss_t)
    assert_close(grad_o, grad_t)
    assert_close(d_o, d_t)
    assert set(log_o) == set(log_t) and set(dlog_o) == set(dlog_t)
    for key in dlog_t:
        assert_close(dlog_o[key], dlog_t[key])
    active = global_step >= kwargs["disc_start"]
    for key in log_t:  # before disc_start taming still computes λ and g_loss (and multiplies by 0)
        if active or key not in ("train/d_weight", "train/g_loss"):
            assert_close(log_o[key].float(), log_t[key].float().mean(), msg=key)
    if not active:
        assert log_o["train/d_weight"] == 0 and log_o["train/g_loss"] == 0


# ----------------------------------------------------------------------------- the fixes

@pytest.fixture
def grad_calls(monkeypatch):
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    return calls


def test_no_adaptive_weight_or_discriminator_before_disc_start(metric, grad_calls):
    loss_module = make_loss(metric, disc_start=5)
    disc_calls = []
    loss_module.discriminator.register_forward_hook(lambda *_: disc_calls.append(1))
    decoder, z, x, codebook_loss = generator_batch()
    loss, log = loss_module(codebook_loss, x, decoder(z), 0, 4, last_layer=decoder.conv_out.weight)
    assert not grad_calls and not disc_calls
    assert log["train/d_weight"] == 0 and log["train/g_loss"] == 0 and log["train/disc_factor"] == 0
    loss, log = loss_module(codebook_loss, x, decoder(z), 0, 5, last_layer=decoder.conv_out.weight)
    assert len(grad_calls) == 2 and len(disc_calls) == 1 and log["train/d_weight"] > 0


def test_adaptive_weight_by_hand(metric):
    loss_module = make_loss(metric, disc_weight=0.7, disc_factor=0.5, codebook_weight=0.4, perceptual_weight=0.8)
    decoder, z, x, codebook_loss = generator_batch(1)
    last = decoder.conv_out.weight

    def grad_of(fn):
        decoder.zero_grad()
        fn(decoder(z)).backward()
        return last.grad.clone()

    nll = lambda xrec: (x - xrec).abs().mean() + 0.8 * metric(x, xrec).mean()
    g = lambda xrec: -loss_module.discriminator(xrec).mean()
    g_nll, g_gan = grad_of(nll), grad_of(g)
    expected = 0.7 * g_nll.norm() / (g_gan.norm() + 1e-4)
    xrec = decoder(z)
    loss, log = loss_module(codebook_loss, x, xrec, 0, 0, last_layer=last)
    assert_close(log["train/d_weight"], expected)
    assert_close(loss, nll(xrec) + expected * 0.5 * g(xrec) + 0.4 * codebook_loss)


def test_generator_gets_gan_gradient_only_after_disc_start(metric):
    loss_module = make_loss(metric, disc_start=3)
    decoder, z, x, codebook_loss = generator_batch(2)
    last = decoder.conv_out.weight

    def grad_at(step):
        decoder.zero_grad()
        loss_module.discriminator.zero_grad(set_to_none=True)
        loss, _ = loss_module(codebook_loss, x, decoder(z), 0, step, last_layer=last)
        loss.backward()
        return last.grad.clone(), loss_module.discriminator.main[0].weight.grad

    decoder.zero_grad()
    ((x - decoder(z)).abs().mean() + metric(x, decoder(z)).mean()).backward()
    reconstruction_only = last.grad.clone()
    before, disc_grad_before = grad_at(2)
    after, _ = grad_at(3)
    assert_close(before, reconstruction_only)
    assert disc_grad_before is None
    assert (after - reconstruction_only).abs().max() > 1e-6


def test_discriminator_step_hinge_value(metric):
    loss_module = make_loss(metric, disc_start=1, disc_factor=0.8)
    x, xrec = images(3), images(4).requires_grad_(True)
    d_loss, log = loss_module(torch.zeros(()), x, xrec, 1, 1)
    real, fake = loss_module.discriminator(x), loss_module.discriminator(xrec)
    expected = 0.8 * 0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean())
    assert_close(d_loss, expected)
    assert_close(log["train/logits_fake"], fake.mean().detach())
    disc_grad, xrec_grad = torch.autograd.grad(d_loss, [loss_module.discriminator.main[0].weight, xrec],
                                               allow_unused=True)
    assert disc_grad.abs().sum() > 0 and xrec_grad is None  # trains D only; the reconstructions are detached
    before, _ = loss_module(torch.zeros(()), x, xrec, 1, 0)
    assert before == 0  # disc_factor is 0 before disc_start
    # fixed logits: 0.5 * (mean(relu(1 - [2, .5])) + mean(relu(1 + [-2, 0]))) = 0.5 * (0.25 + 0.5)
    assert_close(hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])), torch.tensor(0.375))
    softplus = torch.nn.functional.softplus
    assert_close(vanilla_d_loss(torch.tensor([1.0]), torch.tensor([-1.0])), softplus(torch.tensor(-1.0)))


def test_last_layer_required_in_training_only(metric):
    loss_module = make_loss(metric, disc_start=0)
    decoder, z, x, codebook_loss = generator_batch()
    with pytest.raises(ValueError, match="needs last_layer"):
        loss_module(codebook_loss, x, decoder(z), 0, 0)
    loss_module.eval()
    with torch.no_grad():
        _, log = loss_module(codebook_loss, x, decoder(z), 0, 0, last_layer=decoder.conv_out.weight, split="val")
    assert log["val/d_weight"] == 0 and log["val/g_loss"] != 0


def test_perceptual_stays_eval_and_shared(metric):
    loss_module = make_loss(metric)
    loss_module.train()
    assert loss_module.perceptual_loss is metric and not metric.training
    assert loss_module.discriminator.training
    assert make_loss(None, perceptual_weight=0.0).perceptual_loss is None


def test_default_perceptual_warns_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("FASTVQ_VGG16_WEIGHTS", raising=False)
    with pytest.warns(UserWarning, match="no VGG16 weights found"):
        loss_module = VQGANLoss(disc_start=0, disc_ndf=NDF, disc_num_layers=LAYERS)
    assert loss_module.perceptual_loss.fallback


def test_bad_arguments(metric):
    with pytest.raises(ValueError, match="disc_loss must be one of"):
        make_loss(metric, disc_loss="wasserstein")
    with pytest.raises(ValueError, match="disc_start must be"):
        make_loss(metric, disc_start=-1)
    with pytest.raises(ValueError, match="disc_weight must be"):
        make_loss(metric, disc_weight=-0.5)
    loss_module = make_loss(metric)
    x = images(0)
    with pytest.raises(ValueError, match="optimizer_idx must be 0"):
        loss_module(torch.zeros(()), x, x, 2, 0)
    with pytest.raises(ValueError, match="cond must be None"):
        loss_module(torch.zeros(()), x, x, 1, 0, cond=x)
    with pytest.raises(ValueError, match="same shape"):
        loss_module(torch.zeros(()), x, images(1, size=16), 1, 0)


def test_conditional_discriminator(metric):
    loss_module = make_loss(metric, disc_conditional=True, disc_in_channels=4)
    x, xrec, cond = images(0), images(1), images(2, channels=1)
    d_loss, _ = loss_module(torch.zeros(()), x, xrec, 1, 0, cond=cond)
    assert torch.isfinite(d_loss)
    with pytest.raises(ValueError, match="cond must be given"):
        loss_module(torch.zeros(()), x, xrec, 1, 0)
