"""The typed summary: every section reads into attributes, ``to_dict`` gives back the same JSON
(keys in order), missing fields are None, a multi-seed aggregate keeps its ``_std`` siblings."""

import copy
import json
from pathlib import Path

import numpy as np

from pbrf.experiment import analysis as A
from pbrf.experiment import report as R
from pbrf.experiment.analysis.aggregate import aggregate
from pbrf.experiment.analysis.results import (
    Certificates,
    Correlation,
    Decomposition,
    Lds,
    Paired,
    Quality,
    Summary,
)

REFERENCE = Path(__file__).parent.parent / "fixtures" / "tiny_digits_summary.json"


def _reference() -> tuple[dict, str]:
    text = REFERENCE.read_text()
    return json.loads(text), text


def test_reference_summary_round_trips_byte_for_byte():
    data, text = _reference()
    typed = Summary.from_dict(data)
    assert json.dumps(typed.to_dict(), indent=2, allow_nan=False) + "\n" == text
    # built from its fields, as the run builds it: the same dict, the same key order
    built = Summary(**data)
    assert json.dumps(built.to_dict(), indent=2) == json.dumps(data, indent=2)


def test_sections_are_typed_records_with_the_numbers():
    data, _ = _reference()
    s = Summary.from_dict(data)
    assert isinstance(s.decomposition, Decomposition)
    assert s.decomposition.gaps == data["decomposition"]["gaps"]
    assert isinstance(s.correlations["pbrf"], Correlation)
    assert s.correlations["pbrf"].spearman == data["correlations"]["pbrf"]["spearman"]
    assert isinstance(s.certificates, Certificates)
    pbrf_cert = data["certificates"]["by_kind"]["pbrf"]
    assert s.certificates.by_kind["pbrf"].certified == pbrf_cert["certified"]
    assert s.certificates.by_kind["influence"].certified is None  # no certificate: None
    assert s.solvers["practical"].max_residual == data["solvers"]["practical"]["max_residual"]
    assert isinstance(s.paired, Paired)
    assert s.paired.drift["warm"].signed == data["paired"]["drift"]["warm"]["signed"]
    assert s.paired.drift["warm"].mean_abs == data["paired"]["drift"]["warm"]["mean_abs"]
    assert s.paired.decomposition.output_gaps is None
    assert isinstance(s.theta_s, Quality)
    assert s.theta_s.test_metric == data["theta_s"]["test_metric"]
    assert s.lds is None and s.seeds is None  # sections that do not apply


def test_partial_summary_has_none_fields_and_leaves_them_out():
    s = Summary.from_dict({"correlations": {"pbrf": {"pearson": 0.5}}})
    assert s.decomposition is None and s.theta_s is None and s.n_test is None
    assert s.correlations["pbrf"].spearman is None
    assert s.to_dict() == {"correlations": {"pbrf": {"pearson": 0.5}}}
    assert Summary(n_test=3).to_dict() == {"n_test": 3}  # None sections left out
    lds = Lds.from_dict({"subsets": 4, "influence": {"lds": 0.3}})
    assert lds.influence.lds == 0.3 and lds.convergence is None


def test_multi_seed_aggregate_keeps_its_std_siblings():
    data, _ = _reference()
    other = copy.deepcopy(data)
    other["correlations"]["pbrf"]["pearson"] = 0.5
    other["decomposition"]["gaps"]["proximity gap"] *= 3
    agg = aggregate([data, other], [0, 1], ["seed=0", "seed=1"])
    s = Summary.from_dict(agg)
    assert json.dumps(s.to_dict()) == json.dumps(agg)
    mean, std = s.correlations["pbrf"].mean_std("pearson")
    values = [data["correlations"]["pbrf"]["pearson"], 0.5]
    assert mean == np.mean(values) and std == np.std(values, ddof=1)
    gap = data["decomposition"]["gaps"]["proximity gap"]
    mean, std = s.decomposition.mean_std("gaps", "proximity gap")
    assert np.isclose(mean, 2 * gap) and np.isclose(std, np.std([gap, 3 * gap], ddof=1))
    assert s.seeds["train_seeds"] == [0, 1]
    # a single-seed summary has no std
    assert Summary.from_dict(data).correlations["pbrf"].mean_std("pearson")[1] is None


def test_write_report_of_a_typed_summary_writes_its_dict(tmp_path):
    dm = {k: np.random.default_rng(0).normal(size=(3, 4)) for k in A.KINDS}
    typed = Summary(**A.summarise(dm))
    R.write_report(tmp_path, typed, dm, {})
    assert json.loads((tmp_path / "summary.json").read_text()) == typed.to_dict()
    from_dict = tmp_path / "again"
    R.write_report(from_dict, typed.to_dict(), dm, {})
    assert (from_dict / "report.md").read_text() == (tmp_path / "report.md").read_text()
