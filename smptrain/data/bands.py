"""Band normalisation: where each band's factor and offset come from.

Two dataset generations exist (darts-contract §2.3, §2.4):

- the guide's: `config.toml` lists `bands`, `band_factors` and `band_offsets`, and `x` holds
  `clip(raw * factor + offset, 0, 1)`;
- today's DARTS: `bands` are names only, and `x` holds `clip((value - valid_min) / (valid_max - valid_min), 0, 1)`
  (NaN to 0) with each band's valid range from DARTS' central band table. In the older convention that is
  `factor = 1 / (valid_max - valid_min)`, `offset = -valid_min / (valid_max - valid_min)`, so checkpoints and
  converted files carry factors and offsets either way and every consumer gets the same model input.

`data.band_normalisation = {name = [factor, offset]}` overrides both for the bands it names.
"""

from __future__ import annotations

from smptrain.core.errors import UserError

# DARTS' band table (darts-utils bands.py at 4af7791): valid range of the decoded value of each band.
VALID_RANGES = {
    "blue": (-0.1, 0.5), "green": (-0.1, 0.5), "red": (-0.1, 0.5), "nir": (-0.1, 0.5),
    "ndvi": (-1.0, 1.0), "curvature": (-1.0, 1.0),
    "relative_elevation": (-50.0, 50.0), "slope": (0.0, 90.0), "aspect": (0.0, 360.0), "hillshade": (0.0, 1.0),
    "dem": (-100.0, 3000.0),
    "tc_brightness": (0.0, 255.0), "tc_greenness": (0.0, 255.0), "tc_wetness": (0.0, 255.0),
    "s2_scl": (0.0, 11.0), "planet_udm": (0.0, 8.0), "quality_data_mask": (0.0, 2.0), "arcticdem_data_mask": (0.0, 1.0),
    "probabilities": (0.0, 1.0),
}
RANGE_PREFIXES = {"probabilities-": (0.0, 1.0)}
BOOLEAN = ("binarized_segmentation", "extent")  # cast to float as they are: factor 1, offset 0

TABLE = "DARTS band table"
STORED = "config.toml band_factors/band_offsets"


def from_table(name: str) -> tuple[float, float] | None:
    """(factor, offset) of a band from DARTS' table, or None when the table does not know it."""
    if name in BOOLEAN or name.startswith(tuple(f"{b}-" for b in BOOLEAN)):
        return 1.0, 0.0
    valid = VALID_RANGES.get(name) or next((r for p, r in RANGE_PREFIXES.items() if name.startswith(p)), None)
    if valid is None:
        return None
    low, high = valid
    return 1.0 / (high - low), -low / (high - low)


def normalisation(names, stored_factors, stored_offsets, overrides: dict, source: str):
    """(factors, offsets, convention) for every band; an unknown band gets None, refused when it is used."""
    if stored_factors is not None:
        factors, offsets, convention = list(stored_factors), list(stored_offsets), STORED
    else:
        pairs = [from_table(n) for n in names]
        factors = [p[0] if p else None for p in pairs]
        offsets = [p[1] if p else None for p in pairs]
        convention = TABLE
    unknown_overrides = [n for n in overrides if n not in names]
    if unknown_overrides:
        raise UserError(f"data.band_normalisation names band(s) {unknown_overrides} that {source} does not have; "
                        f"it has: {', '.join(names)}")
    for name, (factor, offset) in overrides.items():
        factors[names.index(name)], offsets[names.index(name)] = float(factor), float(offset)
    return tuple(factors), tuple(offsets), convention + (" + data.band_normalisation" if overrides else "")


def require_known(names, factors, source: str) -> None:
    missing = [n for n, f in zip(names, factors) if f is None]
    if missing:
        known = ", ".join([*VALID_RANGES, *(f"{p}*" for p in RANGE_PREFIXES), *BOOLEAN])
        raise UserError(
            f"band(s) {missing} of {source} have no band_factors in config.toml and are not in DARTS' band table "
            f"(which knows: {known}); give their normalisation as data.band_normalisation = "
            f"{{{missing[0]} = [factor, offset]}} (model input = clip(value * factor + offset, 0, 1))")
