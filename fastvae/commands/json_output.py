"""The one line of JSON that ``train`` and ``evaluate --json`` print last."""

import json
import math


def json_line(values: dict) -> str:
    """``values`` as one line of strict JSON: a non-finite float (a diverged run's NaN or inf)
    as null. ``json.dumps`` wrote NaN and Infinity, which jq and JavaScript's JSON.parse refuse."""
    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: strict(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(item) for item in value]
        return value

    return json.dumps(strict(values), allow_nan=False)
