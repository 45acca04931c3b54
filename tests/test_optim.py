"""The fused Adagrad kernels equal straightforward implementations on batches with
duplicated rows; the compiled low-rank pairwise term has autograd's gradient; both
still learn planted data."""

import numpy as np
import pytest
import torch

from model_zoo.batch import FeatureBatch
from model_zoo.embedding import FieldEmbedding, lookup
from model_zoo.metrics import constant_baseline
from model_zoo.optim import FusedSparseAdagrad
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec, Task
from model_zoo.synthetic import PlantedConfig, planted_model
from model_zoo.training import TrainConfig, evaluate, fit_in_memory, minibatches


class ReferenceRowwiseAdagrad(torch.optim.Optimizer):
    """FBGEMM's row-wise Adagrad written plainly: coalesce, then per touched row
    state += mean(g²), row −= lr · g / (√state + eps); dense parameters per element."""

    def __init__(self, params, lr: float, eps: float = 1e-10):
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for parameter in group["params"]:
                grad, lr, eps = parameter.grad, group["lr"], group["eps"]
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                    state = self.state[parameter].setdefault("sum", torch.zeros(parameter.shape[0]))
                    for row, value in zip(rows.tolist(), values):
                        state[row] += value.pow(2).mean()
                        parameter[row] -= lr * value / (state[row].sqrt() + eps)
                else:
                    state = self.state[parameter].setdefault("sum", torch.zeros_like(parameter))
                    state += grad * grad
                    parameter -= lr * grad / (state.sqrt() + eps)


def run(make_optimizer, steps: int, seed: int = 0, coalesce: bool = False) -> list[torch.Tensor]:
    """Three sparse tables (two looked up with the same rows, one with others) and a
    dense parameter, trained on batches with many duplicate rows (with ``coalesce``, the
    sparse gradients coalesced before each step, as the sharded owners hand them)."""
    torch.manual_seed(seed)
    vectors = torch.nn.Embedding(50, 4, sparse=True)
    weights = torch.nn.Embedding(50, 1, sparse=True)  # same rows as `vectors`, like the linear weights
    other = torch.nn.Embedding(30, 4, sparse=True)
    dense = torch.nn.Parameter(torch.randn(3))
    parameters = [vectors.weight, weights.weight, other.weight, dense]
    optimizer = make_optimizer(parameters)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, 50, (32, 5), generator=generator)
        other_rows = torch.randint(0, 30, (32, 5), generator=generator)
        target = torch.randn(32, 5, 4, generator=generator)
        prediction = (vectors(rows) + other(other_rows)) * dense.sum() + weights(rows)
        loss = ((prediction - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        if coalesce:
            for parameter in parameters[:3]:
                parameter.grad = parameter.grad.coalesce()
        optimizer.step()
    return [p.detach().clone() for p in parameters]


def test_fused_sparse_adagrad_equals_torch_adagrad():
    fused = run(lambda ps: FusedSparseAdagrad(ps, lr=0.1), steps=20)
    reference = run(lambda ps: torch.optim.Adagrad(ps, lr=0.1), steps=20)
    for got, expected in zip(fused, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    start = run(lambda ps: FusedSparseAdagrad(ps, lr=0.1), steps=0)
    assert all(not torch.equal(got, initial) for got, initial in zip(fused, start))


@pytest.mark.parametrize("rowwise", [False, True])
def test_fused_adagrad_on_coalesced_gradients_equals_it_on_the_raw_ones(rowwise):
    coalesced = run(lambda ps: FusedSparseAdagrad(ps, lr=0.1, rowwise=rowwise), steps=20, coalesce=True)
    raw = run(lambda ps: FusedSparseAdagrad(ps, lr=0.1, rowwise=rowwise), steps=20)
    for got, expected in zip(coalesced, raw):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_rowwise_adagrad_equals_the_plain_implementation():
    fused = run(lambda ps: FusedSparseAdagrad(ps, lr=0.1, rowwise=True), steps=20)
    reference = run(lambda ps: ReferenceRowwiseAdagrad(ps, lr=0.1), steps=20)
    for got, expected in zip(fused, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    per_element = run(lambda ps: FusedSparseAdagrad(ps, lr=0.1), steps=20)
    assert not torch.allclose(fused[0], per_element[0], rtol=1e-3, atol=1e-4)  # a different optimizer


def test_rowwise_state_is_one_value_per_row():
    table = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = FusedSparseAdagrad(table.parameters(), lr=0.5, rowwise=True)
    table(torch.tensor([3, 3, 7])).sum().backward()
    optimizer.step()
    state = optimizer.state[table.weight]["sum"]
    assert state.shape == (10,)
    # Row 3: summed gradient (2, 2, 2) → mean square 4; row 7: (1, 1, 1) → 1; the rest untouched.
    torch.testing.assert_close(state, torch.tensor([0, 0, 0, 4.0, 0, 0, 0, 1.0, 0, 0]))


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


def test_sparse_updates_reject_float64_tables():
    table = torch.nn.Embedding(10, 2, sparse=True).double()
    optimizer = FusedSparseAdagrad(table.parameters(), lr=0.5)
    table(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse updates need a float32 table, got torch.float64"):
        optimizer.step()


def test_sparse_updates_reject_rows_outside_the_table():
    small, large = torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(8, 2))
    optimizer = FusedSparseAdagrad([large, small], lr=0.5)
    rows = torch.tensor([[1, 6]])  # fits `large`; `small` gets the same rows, so the cached distinct rows
    large.grad = torch.sparse_coo_tensor(rows, torch.ones(2, 2), (8, 2))
    small.grad = torch.sparse_coo_tensor(rows, torch.ones(2, 2), (4, 2), check_invariants=False)
    with pytest.raises(IndexError, match="gradient rows outside the table's 4 rows"):
        optimizer.step()


@pytest.mark.parametrize("kind,rank", [("dplr_fwfm", 3), ("fm", None)])
def test_compiled_pairwise_has_autograd_gradient(kind, rank):
    torch.manual_seed(0)
    schema = FeatureSchema(fields=tuple(FieldSpec(name=f"f{i}", role="context" if i < 2 else "item", vocab_size=5) for i in range(7)))
    model = build_model(schema, kind, 5, **({"rank": rank} if rank else {}))
    if rank:
        with torch.no_grad():
            model.factor_matrix.normal_()
            model.eigen.normal_()
    positions = torch.tensor([0, 2, 3, 5])
    vectors = torch.randn(33, 4, 5, requires_grad=True)
    weights = torch.randn(33)
    results = []
    for compiled in (True, False):
        vectors.grad = None
        model.zero_grad()
        if compiled:
            pairwise = model.pairwise(vectors, positions)
        else:  # the same equation through torch ops and autograd
            factors, eigen = model.factors()
            factors = factors[:, positions]
            pairwise = model.pairwise_from(vectors, torch.matmul(factors, vectors), factors, eigen)
        (pairwise * weights).sum().backward()
        gradients = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append([pairwise.detach(), vectors.grad.clone(), *gradients])
    assert len(results[0]) == len(results[1]) == (4 if rank else 2)
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_rowwise_adagrad_learns_planted_data_like_adagrad():
    planted = planted_model(PlantedConfig(structure="dplr", rank=2, vocab_size=20, seed=4))
    rng = np.random.default_rng(104)
    train, valid = (FeatureBatch.from_columns(planted.schema, *planted.sample(rows, rng)[:2]) for rows in (20_000, 5_000))
    constant = constant_baseline(Task.binary, train.label.numpy(), valid.label.numpy())
    aucs = {}
    for optimizer in ("adagrad", "rowwise_adagrad"):
        torch.manual_seed(0)
        model = build_model(planted.schema, "dplr_fwfm", 8, rank=2, sparse=True)
        fit_in_memory(model, TrainConfig(epochs=3, batch_size=256, optimizer=optimizer, learning_rate=0.05), train, valid)
        aucs[optimizer] = evaluate(model, minibatches(valid, 4096))["auc"]
    assert aucs["rowwise_adagrad"] > constant["auc"] + 0.2, aucs
    assert abs(aucs["rowwise_adagrad"] - aucs["adagrad"]) < 0.02, aucs


@pytest.mark.parametrize("sparse", [True, False])
def test_prefetched_lookup_equals_nn_embedding(sparse):
    torch.manual_seed(0)
    table = torch.nn.Embedding(40, 3, sparse=sparse)
    rows = torch.randint(0, 40, (17, 5))
    weights = torch.randn(17, 5, 3)
    results = []
    for gather in (lambda: lookup(table, rows), lambda: table(rows)):
        table.zero_grad()
        out = gather()
        (out * weights).sum().backward()
        grad = table.weight.grad
        results.append((out.detach(), grad.to_dense() if sparse else grad))
        assert grad.is_sparse == sparse
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError, match="embedding row out of range"):
        lookup(table, torch.tensor([[1, 40]]))


def test_row_sq_norm_is_the_looked_up_rows_squared_norm_with_its_gradient():
    torch.manual_seed(0)
    schema = FeatureSchema(fields=tuple(FieldSpec(name=f"f{i}", role="context", vocab_size=4) for i in range(3)))
    embedding = FieldEmbedding(schema, 5)
    batch = FeatureBatch.from_columns(schema, {"f0": [1, 1, 2], "f1": [0, 3, 3], "f2": [2, 2, 2]})
    rows = embedding.global_rows(batch).reshape(-1)
    embedded = embedding(batch)
    embedded.row_sq_norm.backward()
    weight = embedding.vectors.weight.detach()
    torch.testing.assert_close(embedded.row_sq_norm.detach(), weight[rows].pow(2).sum())
    counts = torch.bincount(rows, minlength=weight.shape[0]).float().unsqueeze(1)
    torch.testing.assert_close(embedding.vectors.weight.grad, 2 * counts * weight)
