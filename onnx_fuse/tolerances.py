"""Check tolerances given on the command line the way Polygraphy takes them: `--atol 1e-4` for
every output, `--atol logits:1e-3` for one, both forms in one list (`--atol 1e-4 logits:1e-3`).

A value given for an output wins over the global one, which wins over the output dtype's default
(check._TOLERANCES). Only the tolerance named is replaced: `--atol` alone keeps the dtype's rtol.
The comparison itself stays the checker's: |candidate - reference| <= atol + rtol * |reference|
elementwise (Polygraphy's default "elemwise" check passes an element when either bound holds,
which is looser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import BadInput

EVERY_OUTPUT = ""  # the key of a value given without an output name


@dataclass(frozen=True)
class Tolerances:
    """Per-output overrides of the check's tolerances ({output name or EVERY_OUTPUT: value})."""

    atol: dict[str, float] = field(default_factory=dict)
    rtol: dict[str, float] = field(default_factory=dict)

    def resolve(self, output: str, default: tuple[float, float] | None) -> tuple[float, float] | None:
        """(atol, rtol) for `output`; None where nothing is overridden and there is no default
        (a non-floating output, compared exactly)."""
        if default is None:
            return None
        atol, rtol = default
        atol = self.atol.get(output, self.atol.get(EVERY_OUTPUT, atol))
        rtol = self.rtol.get(output, self.rtol.get(EVERY_OUTPUT, rtol))
        return atol, rtol

    def named_outputs(self) -> set[str]:
        return (set(self.atol) | set(self.rtol)) - {EVERY_OUTPUT}

    def require_outputs(self, outputs: list[str]) -> None:
        """BadInput when a tolerance names an output the model does not have (a typo would
        otherwise leave that output at the default without a word)."""
        unknown = sorted(self.named_outputs() - set(outputs))
        if unknown:
            raise BadInput(f"tolerance given for unknown output(s) {', '.join(unknown)} "
                           f"(the model's outputs: {', '.join(outputs)})")


def parse_tolerances(atol: list[str] | None, rtol: list[str] | None) -> Tolerances | None:
    """Tolerances from the `--atol`/`--rtol` arguments; None when neither was given."""
    if not atol and not rtol:
        return None
    return Tolerances(_parse_list(atol or [], "--atol"), _parse_list(rtol or [], "--rtol"))


def _parse_list(values: list[str], flag: str) -> dict[str, float]:
    parsed: dict[str, float] = {}
    for value in values:
        # The value follows the last colon, so output names may contain colons themselves.
        name, _, number = value.rpartition(":")
        if name in parsed:
            what = f"output '{name}'" if name else "every output"
            raise BadInput(f"{flag}: {what} given twice")
        parsed[name] = _tolerance(number, value, flag)
    return parsed


def _tolerance(text: str, value: str, flag: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise BadInput(f"{flag} {value!r}: expected [OUTPUT:]NUMBER, e.g. 1e-4 or logits:1e-3") from None
    if not math.isfinite(number) or number < 0:
        raise BadInput(f"{flag} {value!r}: a tolerance is a finite number >= 0")
    return number
