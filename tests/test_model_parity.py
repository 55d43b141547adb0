"""Our model against Hugging Face transformers on tiny random models of every supported family."""
import pytest
import torch

from conftest import FAMILIES, converted_checkpoint
from checkpoint import load_model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    hf, out = converted_checkpoint(tmp_path_factory, request.param)
    return hf, load_model(str(out))


def test_prefill_logits_match(pair):
    hf, ours = pair  # (on one device: test_cuda runs these on a GPU)
    device = ours.norm.weight.device
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1)).to(device)
    ours.setup_caches(2, 64)
    with torch.no_grad():
        expected = hf(tokens).logits
    got = ours(tokens, torch.arange(40, device=device))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_decode_through_kv_cache_matches(pair):
    hf, ours = pair
    device = ours.norm.weight.device
    tokens = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2)).to(device)
    ours.setup_caches(1, 64)
    with torch.no_grad():
        expected = hf(tokens).logits
    ours(tokens[:, :8], torch.arange(8, device=device))  # prefill 8, then one token at a time
    for i in range(8, 24):
        got = ours(tokens[:, i:i + 1], torch.tensor([i], device=device))
        torch.testing.assert_close(got[:, 0], expected[:, i], atol=1e-4, rtol=0)


def test_left_padded_rows_equal_rows_alone(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(0, 128, (5,), generator=g), torch.randint(0, 128, (9,), generator=g)
    ours.setup_caches(1, 32)
    alone = ours(short[None], torch.arange(5))[0, -1]
    ours.setup_caches(2, 32)
    batch = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), short]), long])
    padded = ours(batch, torch.arange(9), left_pad=torch.tensor([4, 0]))[0, -1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
