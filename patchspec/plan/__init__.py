"""From a spec and the sizes of a model and input to the cells a sweep runs.

* :mod:`~patchspec.plan.sizes`: :class:`Sizes`, the size of every named dim;
* :mod:`~patchspec.plan.grid`: :func:`compile` -> :class:`Grid` (cached; cells implicit);
* :mod:`~patchspec.plan.cells`: explicit :class:`Cell` s and :class:`Region` s (custom rules,
  explicit cell lists, the reference estimator);
* :mod:`~patchspec.plan.positions`: named positions resolved per prompt.
"""

from patchspec.plan.cells import Cell, DimIndex, PerExample, Region, regions_of
from patchspec.plan.grid import Axis, Grid, Part, compile, explicit_grid
from patchspec.plan.positions import Aligned, Positions, PositionTable, resolve_positions
from patchspec.plan.sizes import Sizes

__all__ = [
    "Aligned",
    "Axis",
    "Cell",
    "DimIndex",
    "Grid",
    "Part",
    "PerExample",
    "PositionTable",
    "Positions",
    "Region",
    "Sizes",
    "compile",
    "explicit_grid",
    "regions_of",
    "resolve_positions",
]
