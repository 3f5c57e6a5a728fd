"""schemathesis against the app's own OpenAPI schema: whatever the schema allows or forbids, no 5xx.

Every operation gets examples that fit the schema and examples that break it. (schemathesis'
pytest plugin does not run under this pytest, so its strategies drive hypothesis directly.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES = 30  # per operation and mode: about 10 s on the 2-core development machine


# schemathesis' own strategies draw from `random`, which hypothesis flags under derandomize.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_no_input_makes_a_server_error(base_url, engine):
    schema = schemathesis.openapi.from_url(base_url + "/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    server_errors: list[str] = []
    calls = 0

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                nonlocal calls
                calls += 1
                response = case.call(timeout=60)
                if response.status_code >= 500:
                    server_errors.append(f"{operation.label} [{mode}] {response.status_code}: "
                                         f"{case.body!r} -> {response.text[:300]}")

            try:
                check()
            except Unsatisfiable:  # nothing to break in an operation without parameters
                assert mode is GenerationMode.NEGATIVE

    assert not server_errors, "\n".join(server_errors)
    assert calls >= len(operations) * EXAMPLES  # the positive examples alone
    assert engine.error is None and not engine.engine.has_unfinished()
