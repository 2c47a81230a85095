"""The simulator's validation set (tools/validate_sim.py) shares no configuration with the runs that
`hpcmoe calibrate` fits the machine file on: a prediction error measured on the fit's own runs is
not evidence (issue [4/7])."""

import os
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import validate_sim  # noqa: E402


def test_no_validation_configuration_is_a_calibration_run():
    validate_sim.check_disjoint()


def test_the_check_finds_a_calibration_run_in_the_set():
    """It can fail: the -n 2 calibration run (debug model, decoding longer) and the wide one are caught."""
    for name, row in {"debug_n2": (validate_sim.DEBUG, 2, []), "wide_n2": (validate_sim.WIDE, 2, [])}.items():
        with pytest.raises(
            ValueError, match=f"validation configuration {name} is one of hpcmoe calibrate's runs"
        ):
            validate_sim.check_disjoint({name: row})
    validate_sim.check_disjoint({"debug_n2_batch12": (validate_sim.DEBUG, 2, validate_sim.BATCH_12)})
