"""Pre-training objectives: masking rule, augmentations, and the all-gathered CLIP loss
under a real 2-process gloo DDP run matching one process on the concatenated batch."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mim_rec.encoders import build_text_encoder
from mim_rec.pretrain import ClipLoss, MaskedLanguageModelling, augment, mask_tokens
from mim_rec.utils.dist import run_on_spawned_ranks
from tests.encoder_fixtures import tiny_text

torch.set_num_threads(1)

BATCH, WORLD = 8, 2


class _Towers(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Linear(6, 4)
        self.title = nn.Linear(5, 4)
        self.loss = ClipLoss()

    def forward(self, images, titles):
        return self.loss(F.normalize(self.image(images), dim=-1),
                         F.normalize(self.title(titles), dim=-1))


def _inputs():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 6, generator=generator), torch.randn(BATCH, 5, generator=generator)


def _reference():
    torch.manual_seed(0)
    model = _Towers()
    loss = model(*_inputs())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _half_batch_step(rank: int, device) -> dict:
    """The mean loss over the ranks and the DDP-averaged gradients, each rank on half the batch."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(_Towers())
    images, titles = _inputs()
    half = BATCH // WORLD
    loss = model(images[rank * half:(rank + 1) * half], titles[rank * half:(rank + 1) * half])
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= WORLD
    return {"loss": mean_loss, "grads": {n: p.grad for n, p in model.module.named_parameters()}}


@pytest.mark.slow
def test_all_gathered_clip_loss_matches_single_process():
    got, _ = run_on_spawned_ranks(_half_batch_step, WORLD, "cpu")
    want_loss, want_grads = _reference()
    torch.testing.assert_close(got["loss"], want_loss, atol=1e-6, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got["grads"][name], grad, atol=1e-6, rtol=1e-5)


def test_clip_loss_prefers_matched_pairs_and_caps_temperature():
    loss = ClipLoss()
    eye = torch.eye(4)
    assert loss(eye, eye) < loss(eye, eye.roll(1, dims=0))
    with torch.no_grad():
        loss.temperature.log_scale.fill_(10.0)
    assert loss.temperature().item() == pytest.approx(100.0)


def test_a_capped_temperature_can_come_back_down():
    """Clamped inside the forward, a log scale past the cap had a zero gradient: once momentum
    carried it over, pairs that wanted a smaller scale could never lower it."""
    loss = ClipLoss(gather=False)
    with torch.no_grad():
        loss.temperature.log_scale.fill_(loss.temperature.max_log_scale + 0.5)  # where momentum left it
    optimizer = torch.optim.SGD(loss.parameters(), lr=1e-3)
    anchors = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    for _ in range(5):  # mismatched pairs: a smaller scale lowers the loss
        optimizer.zero_grad()
        loss(anchors, anchors.roll(1, dims=0)).backward()
        assert loss.temperature.log_scale.grad.item() > 0
        optimizer.step()
    assert loss.temperature().item() < 100.0 * 0.99


def test_info_nce_under_bf16_autocast_is_the_fp32_loss():
    """Under precision=bf16 the logits were bf16: at logit scale 100 the loss moved by ~1e-2."""
    from mim_rec.pretrain.contrastive import symmetric_info_nce

    torch.manual_seed(0)
    a = F.normalize(torch.randn(32, 64), dim=1)
    b = F.normalize(a + 0.3 * torch.randn(32, 64), dim=1)
    scale = torch.tensor(100.0)
    want = symmetric_info_nce(a, b, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = symmetric_info_nce(a, b, scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_mask_tokens_follows_bert_rule():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 32), generator=generator)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    corrupted, labels = mask_tokens(ids, special, mask_token_id=1, vocab_size=1000,
                                    generator=generator)
    chosen = labels != -100
    assert not chosen[:, 0].any()
    assert 0.12 < chosen.float().mean() < 0.18
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    masked_share = (corrupted[chosen] == 1).float().mean()
    assert 0.7 < masked_share < 0.9


def test_mlm_loss_is_finite_and_trains_only_through_text():
    text = build_text_encoder(tiny_text())
    mlm = MaskedLanguageModelling(text, probability=0.5)
    torch.manual_seed(0)
    loss = mlm(text, ["red square item", "blue dot item two", "green stripe"])
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert text.model.encoder.layer[-1].output.dense.weight.grad is not None


def test_augment_is_seeded_and_keeps_shape():
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    first = augment(pixels)
    torch.manual_seed(1)
    assert torch.equal(first, augment(pixels))
    assert first.shape == pixels.shape and first.dtype == torch.uint8
    assert not torch.equal(first, pixels)
