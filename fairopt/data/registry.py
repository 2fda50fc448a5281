"""``load(name, **kwargs)``: every dataset of :mod:`fairopt.data` by name."""

from __future__ import annotations

from typing import Callable

from fairopt.data import synthetic, tabular
from fairopt.data.dataset import Dataset, Splits

__all__ = ["load", "DATASETS"]

#: name -> loader. ``waterbirds_like`` and ``digits_lt`` return :class:`Splits` (they come with
#: their own balanced test split); every other loader returns a :class:`Dataset`.
DATASETS: dict[str, Callable[..., Dataset | Splits]] = {
    "credit": tabular.credit,
    "adult": tabular.adult,
    "compas": tabular.compas,
    "german": tabular.german,
    "celeba_attributes": tabular.celeba_attributes,
    "drug": tabular.drug,
    "synthetic": synthetic.synthetic_subgroups,
    "synthetic_subgroups": synthetic.synthetic_subgroups,
    "waterbirds_like": synthetic.waterbirds_like,
    "digits_lt": synthetic.digits_lt,
}


def load(name: str, **kwargs) -> Dataset | Splits:
    """Loads a dataset by name, passing ``kwargs`` to its loader.

    Args:
      name: one of :data:`DATASETS` (credit, adult, compas, german, celeba_attributes, drug,
        synthetic / synthetic_subgroups, waterbirds_like, digits_lt).
      **kwargs: the loader's arguments, e.g. ``load("adult", group="race")``.

    Returns:
      A :class:`Dataset`, or :class:`Splits` for ``waterbirds_like`` and ``digits_lt``.

    Raises:
      ValueError: unknown name (the message lists the choices).
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
