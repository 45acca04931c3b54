import numpy as np
import torch

from model_zoo.optim import FusedSparseAdagrad


def run(optimizer_class, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    table = torch.nn.Embedding(50, 4, sparse=True)
    dense = torch.nn.Parameter(torch.randn(3))
    optimizer = optimizer_class([table.weight, dense], lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, 50, (32, 5), generator=generator)  # many duplicate rows per batch
        target = torch.randn(32, 5, 4, generator=generator)
        loss = ((table(rows) * dense.sum() - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return table.weight.detach().clone(), dense.detach().clone()


def test_fused_sparse_adagrad_equals_torch_adagrad():
    fused_table, fused_dense = run(FusedSparseAdagrad, steps=20)
    torch_table, torch_dense = run(torch.optim.Adagrad, steps=20)
    torch.testing.assert_close(fused_table, torch_table, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_dense, torch_dense, rtol=1e-5, atol=1e-6)
    untouched_start, _ = run(FusedSparseAdagrad, steps=0)
    assert not torch.equal(fused_table, untouched_start)


def test_rows_not_looked_up_are_untouched():
    table = torch.nn.Embedding(10, 2, sparse=True)
    before = table.weight.detach().clone()
    optimizer = FusedSparseAdagrad(table.parameters(), lr=0.5)
    table(torch.tensor([3, 3, 7])).sum().backward()
    optimizer.step()
    changed = (table.weight.detach() != before).any(dim=1)
    assert changed.nonzero().squeeze(1).tolist() == [3, 7]
    # Row 3 was looked up twice: Adagrad on the summed gradient (2) gives the same step as on 1: lr.
    np.testing.assert_allclose((before[3] - table.weight.detach()[3]).numpy(), [0.5, 0.5], rtol=1e-5)
