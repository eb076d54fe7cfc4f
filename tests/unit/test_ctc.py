import torch

from tasks.ctc import embedding_ctc_loss, greedy_ctc_decode


def test_ctc_prefers_outputs_that_spell_the_transcript():
    torch.manual_seed(0)
    V, D, blank = 20, 16, 0
    table = torch.randn(V, D)
    target = [3, 5, 7]
    spelled = table[[3, 3, blank, 5, 7, blank]].unsqueeze(0)   # [1, 6, D]
    noise = torch.randn(1, 6, D)
    lengths, owner = torch.tensor([6]), torch.tensor([0])
    good = embedding_ctc_loss(spelled, lengths, owner, [target], table, blank)
    bad = embedding_ctc_loss(noise, lengths, owner, [target], table, blank)
    assert good < 0.5 * bad
    assert greedy_ctc_decode(spelled, lengths, table, blank) == [target]


def test_ctc_ignores_non_transcript_and_multi_clip_samples():
    table = torch.randn(10, 4)
    out = torch.randn(3, 5, 4, requires_grad=True)
    owner = torch.tensor([0, 0, 1])  # sample 0 has two clips: no single transcript alignment
    assert embedding_ctc_loss(out, torch.tensor([5, 5, 5]), owner, [[1, 2], None], table, 0) is None
    loss = embedding_ctc_loss(out, torch.tensor([5, 5, 5]), owner, [[1, 2], [3, 4]], table, 0)
    loss.backward()
    assert out.grad[:2].abs().sum() == 0 and out.grad[2].abs().sum() > 0
