"""Kubernetes quantities (`2`, `500m`, `1.5Gi`, `1e3`) as resource fields take them.

A field of type `Quantity` takes what a Pod's resources take: an integer or a
string in the quantity grammar, checked in the CRD by the pattern Kubernetes
publishes for `resource.Quantity` and by CEL's quantity library, and here by
`parse_quantity`, which gives the exact value so two quantities can be compared.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal
from typing import Annotated, Final

from pydantic import BeforeValidator, WithJsonSchema

# The pattern of `resource.Quantity` in Kubernetes' published OpenAPI schemas.
QUANTITY_PATTERN: Final = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

_BINARY: Final = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL: Final = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_GRAMMAR: Final = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<binary>[KMGTPE]i)|(?P<exponent>[eE][+-]?[0-9]+)|(?P<decimal>[numkMGTPE]?))"
)
# Wide enough that no value a person writes is rounded.
_EXACT: Final = Context(prec=80, Emax=999_999_999, Emin=-999_999_999)
EXAMPLES: Final = "e.g. 2, 500m, 1.5Gi"


class QuantityError(ValueError):
    """Text that is not a Kubernetes quantity."""


def parse_quantity(value: int | str) -> Decimal:
    """The value of a quantity (`1.5Gi` -> 1610612736, `500m` -> 0.5).

    Suffixes Ki..Ei (powers of 1024), n, u, m, k..E (powers of 1000) and decimal
    exponents (`1e3`), as Kubernetes reads them; QuantityError otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise QuantityError(f"a quantity is an integer or a string ({EXAMPLES})")
    if isinstance(value, int):
        return Decimal(value)
    match = _GRAMMAR.fullmatch(value)
    if match is None:
        raise QuantityError(f"{value!r} is not a Kubernetes quantity ({EXAMPLES})")
    number = Decimal(match["number"])
    try:
        if match["binary"]:
            return _EXACT.multiply(number, Decimal(1024) ** _BINARY[match["binary"]])
        if match["exponent"]:
            return number.scaleb(int(match["exponent"][1:]), _EXACT)
        return number.scaleb(_DECIMAL.get(match["decimal"], 0), _EXACT)
    except ArithmeticError:
        raise QuantityError(f"{value!r} is out of range for a quantity") from None


def _as_quantity(value: object) -> str:
    if isinstance(value, float):
        raise QuantityError(
            f"{value} is a number with a fraction: write it as a string ({EXAMPLES})"
        )
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise QuantityError(f"a quantity is an integer or a string ({EXAMPLES})")
    if parse_quantity(value) < 0:
        raise QuantityError(f"{value} is negative")
    return str(value)


# The CRD's check of one quantity field: the pattern above, then what Kubernetes
# itself parses (the pattern admits fractional exponents, the parser does not).
QUANTITY_RULE: Final = {
    "rule": "isQuantity(string(self)) && !quantity(string(self)).isLessThan(quantity('0'))",
    "message": f"must be a non-negative Kubernetes quantity ({EXAMPLES})",
}

QUANTITY_SCHEMA: Final = {
    "x-kubernetes-int-or-string": True,
    "pattern": QUANTITY_PATTERN,
    "x-kubernetes-validations": [QUANTITY_RULE],
}

# A non-negative quantity as given (an integer is kept as its decimal text).
Quantity = Annotated[str, BeforeValidator(_as_quantity), WithJsonSchema(QUANTITY_SCHEMA)]
