"""Settings from the environment: every number converted and checked, a bad value refused in one line naming it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from bikeshare_membership.config import (
    ENVIRONMENT,
    INVALID_SETTING_STATUS,
    LIMITS,
    InvalidSetting,
    Settings,
    settings_from_env,
)

REFUSED = {
    "MODEL_PORT": {
        "abc": "MODEL_PORT: 'abc' is not an integer",
        "": "MODEL_PORT: '' is not an integer",
        "96.5": "MODEL_PORT: '96.5' is not an integer",
        "0": "MODEL_PORT: '0' is not a port number from 1 to 65535",
        "65536": "MODEL_PORT: '65536' is not a port number from 1 to 65535",
    },
    "MAX_BODY_BYTES": {"0": "MAX_BODY_BYTES: '0' is not above 0", "-1": "MAX_BODY_BYTES: '-1' is not above 0"},
    "MAX_TRIPS_PER_REQUEST": {"0": "MAX_TRIPS_PER_REQUEST: '0' is not above 0"},
    "MAX_BATCH_JOBS": {"0": "MAX_BATCH_JOBS: '0' is not above 0", "two": "MAX_BATCH_JOBS: 'two' is not an integer"},
    "MODEL_FETCH_TIMEOUT": {
        "0": "MODEL_FETCH_TIMEOUT: '0' is not above 0",
        "-2.5": "MODEL_FETCH_TIMEOUT: '-2.5' is not above 0",
        "10s": "MODEL_FETCH_TIMEOUT: '10s' is not a number",
        "nan": "MODEL_FETCH_TIMEOUT: 'nan' is not a finite number",
        "inf": "MODEL_FETCH_TIMEOUT: 'inf' is not a finite number",
    },
    "WORKER_TIMEOUT": {"0": "WORKER_TIMEOUT: '0' is not above 0"},
    "GRACEFUL_TIMEOUT": {"-30": "GRACEFUL_TIMEOUT: '-30' is not above 0"},
    "WEB_CONCURRENCY": {"0": "WEB_CONCURRENCY: '0' is not above 0", "two": "WEB_CONCURRENCY: 'two' is not an integer"},
    "MODEL_FETCH_RETRIES": {"-1": "MODEL_FETCH_RETRIES: '-1' is not 0 or more"},
    "MODEL_REFRESH_SECONDS": {
        "-60": "MODEL_REFRESH_SECONDS: '-60' is not 0 or more (0: check only when a reload is requested)",
        "1m": "MODEL_REFRESH_SECONDS: '1m' is not a number",
    },
    "EVAL_MIN_ROC_AUC": {
        "1.01": "EVAL_MIN_ROC_AUC: '1.01' is not between 0 and 1",
        "-0.1": "EVAL_MIN_ROC_AUC: '-0.1' is not between 0 and 1",
        "60%": "EVAL_MIN_ROC_AUC: '60%' is not a number",
    },
}


@pytest.mark.parametrize(
    ("variable", "text"), [(variable, text) for variable, texts in REFUSED.items() for text in texts]
)
def test_a_bad_value_names_the_variable_and_the_problem_in_one_line(variable: str, text: str) -> None:
    with pytest.raises(InvalidSetting) as refused:
        Settings.from_env({"MODEL_PORT": "9000", variable: text})
    assert str(refused.value) == REFUSED[variable][text]
    assert isinstance(refused.value, ValueError)


def test_a_value_that_would_break_the_line_stays_on_it() -> None:
    with pytest.raises(InvalidSetting, match=r"^MAX_BODY_BYTES: '1\\n2' is not an integer$"):
        Settings.from_env({"MAX_BODY_BYTES": "1\n2"})


ACCEPTED: dict[str, dict[str, Any]] = {
    "MODEL_PORT": {"1": 1, "65535": 65535, " 8080 ": 8080},
    "MODEL_FETCH_RETRIES": {"0": 0},  # one attempt
    "MODEL_REFRESH_SECONDS": {"0": 0.0, "0.5": 0.5},  # 0: only when a reload is requested
    "MODEL_FETCH_TIMEOUT": {"0.5": 0.5, "3": 3.0},
    "EVAL_MIN_ROC_AUC": {"0": 0.0, "1": 1.0, "0.75": 0.75},
    "MAX_BATCH_JOBS": {"1": 1},
    "MAX_TRIPS_PER_REQUEST": {"1": 1},
    "MODEL_PATH": {"": None, "/models/m": "/models/m"},
    "BATCH_S3_PREFIX": {"": ""},
}


@pytest.mark.parametrize(
    ("variable", "text"), [(variable, text) for variable, texts in ACCEPTED.items() for text in texts]
)
def test_values_at_the_limits_are_accepted(variable: str, text: str) -> None:
    name = next(name for name, known in ENVIRONMENT.items() if known == variable)
    value = getattr(Settings.from_env({variable: text}), name)
    assert value == ACCEPTED[variable][text] and type(value) is type(ACCEPTED[variable][text])


def test_every_number_has_limits_that_its_default_meets() -> None:
    numbers = {field.name for field in dataclasses.fields(Settings) if isinstance(field.default, int | float)}
    assert set(LIMITS) == numbers
    for name, (allowed, _) in LIMITS.items():
        assert allowed(getattr(Settings, name)), name
    assert Settings.from_env({}) == Settings()


def test_an_entry_point_exits_with_the_line_and_status_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        settings_from_env("train.py", {"MODEL_FETCH_RETRIES": "-1"})
    assert exited.value.code == INVALID_SETTING_STATUS == 2
    assert capsys.readouterr().err == "train.py: MODEL_FETCH_RETRIES: '-1' is not 0 or more\n"
    assert settings_from_env("train.py", {"MODEL_FETCH_RETRIES": "0"}).fetch_retries == 0
