import pytest
import torch

from tasks.merge import merge_embeddings, valid_rows


def naive_merge(text, ids, pid, rows):
    out = text.clone()
    k = 0
    for b in range(text.shape[0]):
        for t in range(text.shape[1]):
            if ids[b, t] == pid:
                out[b, t] = rows[k]
                k += 1
    return out


def test_merge_matches_per_sample_loop():
    torch.manual_seed(0)
    B, L, D, pid = 3, 11, 5, 7
    ids = torch.randint(0, 6, (B, L))
    ids[0, 2:5] = pid
    ids[2, 0] = pid
    ids[2, 8:11] = pid
    text = torch.randn(B, L, D)
    rows = torch.randn(int((ids == pid).sum()), D)
    got = merge_embeddings(text, ids == pid, rows)
    assert torch.equal(got, naive_merge(text, ids, pid, rows))
    assert torch.equal(got[ids != pid], text[ids != pid])  # text positions untouched


def test_merge_count_mismatch_raises():
    ids = torch.tensor([[1, 7, 7, 2]])
    with pytest.raises(ValueError, match="count mismatch: 2 placeholder"):
        merge_embeddings(torch.zeros(1, 4, 3), ids == 7, torch.zeros(3, 3))


def test_merge_width_mismatch_raises():
    ids = torch.tensor([[7]])
    with pytest.raises(ValueError, match="width"):
        merge_embeddings(torch.zeros(1, 1, 3), ids == 7, torch.zeros(1, 4))


def test_merge_gradient_flows_to_modality_rows():
    rows = torch.randn(2, 3, requires_grad=True)
    ids = torch.tensor([[7, 1, 7]])
    merge_embeddings(torch.zeros(1, 3, 3), ids == 7, rows).sum().backward()
    assert torch.equal(rows.grad, torch.ones(2, 3))


def test_valid_rows_keeps_sample_order():
    emb = torch.arange(2 * 3 * 1, dtype=torch.float).reshape(2, 3, 1)
    rows = valid_rows(emb, torch.tensor([2, 3]))
    assert rows.squeeze(-1).tolist() == [0, 1, 3, 4, 5]
