"""Every registered method and each of its variants keeps the contract in ``method_contract.py``."""

import pytest

from conftest import METHOD_CASES, case_id
from method_contract import MethodContract


class TestRegisteredMethods(MethodContract):
    @pytest.fixture(params=METHOD_CASES, ids=case_id)
    def case(self, request):
        return request.param
