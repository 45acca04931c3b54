import numpy as np
import pytest
import torch

from model_zoo.diagnostics import (
    embedding_set_information_abundance,
    field_information_abundance,
    information_abundance,
    plot_information_abundance,
    singular_values,
)
from model_zoo.registry import build_model
from model_zoo.schema import FeatureSchema, FieldSpec


def with_spectrum(rows: int, spectrum: list[float], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.normal(size=(rows, len(spectrum))))
    right, _ = np.linalg.qr(rng.normal(size=(len(spectrum), len(spectrum))))
    return (left * np.array(spectrum)) @ right.T


@pytest.mark.parametrize(
    "spectrum,expected",
    [([3.0, 2.0, 1.0, 0.5], 6.5 / 3.0), ([1.0] * 8, 8.0), ([5.0, 0.0, 0.0, 0.0], 1.0), ([2.0, 1.0], 1.5)],
)
def test_information_abundance_of_known_spectra(spectrum, expected):
    table = with_spectrum(500, spectrum)
    # The Gram route resolves singular values down to about sqrt(eps) * sigma_max.
    np.testing.assert_allclose(singular_values(table), sorted(spectrum, reverse=True), atol=1e-6)
    assert information_abundance(table) == pytest.approx(expected, rel=1e-6)
    assert information_abundance(torch.tensor(table, dtype=torch.float32)) == pytest.approx(expected, rel=1e-4)


def test_zero_table_and_per_field_values():
    assert information_abundance(np.zeros((10, 4))) == 0.0
    schema = FeatureSchema(fields=(FieldSpec(name="a", role="context", vocab_size=50), FieldSpec(name="b", role="item", vocab_size=30)))
    model = build_model(schema, "fm", 4)
    with torch.no_grad():
        model.embedding.vectors.weight[:50] = torch.tensor(with_spectrum(50, [1.0, 1.0, 1.0, 1.0]), dtype=torch.float32)
        model.embedding.vectors.weight[50:] = torch.tensor(with_spectrum(30, [4.0, 0.0, 0.0, 0.0]), dtype=torch.float32)
    values = field_information_abundance(model)
    assert values["a"] == pytest.approx(4.0, rel=1e-4) and values["b"] == pytest.approx(1.0, rel=1e-4)


def test_plot_is_written(tmp_path):
    plot_information_abundance({"single": {"a": 2.0, "b": 3.0}}, {"a": 10, "b": 5}, tmp_path / "ia.png")
    assert (tmp_path / "ia.png").stat().st_size > 5_000


def test_multi_embedding_ia_per_set_and_mean():
    schema = FeatureSchema(fields=(FieldSpec(name="a", role="context", vocab_size=40), FieldSpec(name="b", role="item", vocab_size=40)))
    model = build_model(schema, "me_fm", 4, sets=2)
    with torch.no_grad():
        model.embedding_sets[0].embedding.vectors.weight[:] = torch.tensor(with_spectrum(80, [1.0, 0.0, 0.0, 0.0]), dtype=torch.float32)
        model.embedding_sets[1].embedding.vectors.weight[:] = torch.tensor(with_spectrum(80, [1.0, 1.0, 1.0, 1.0]), dtype=torch.float32)
    per_set = embedding_set_information_abundance(model)
    assert per_set[0]["a"] == pytest.approx(1.0, abs=1e-3)
    assert field_information_abundance(model)["a"] == pytest.approx((per_set[0]["a"] + per_set[1]["a"]) / 2)
