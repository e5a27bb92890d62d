"""segcompress study package: compressing ViT-style semantic segmenters for edge devices.

One module per concept (see README.md):

- :mod:`study.profiles` - experiment sizes (``smoke``, ``cpu``, ``paper``) as dataclasses
- :mod:`study.cache`    - content-addressed artifact cache with atomic writes
- :mod:`study.context`  - what a notebook gets: profile, seed, cache, data, table/figure writers
- :mod:`study.data`     - embedded UAV disaster dataset generator and the LPCVC loader
- :mod:`study.models`   - registry of segmentation models and their params / MACs
- :mod:`study.train`    - training loop, evaluation, cached baselines
- :mod:`study.metrics`  - mIoU, mDice (LPCVC score), pixel accuracy
- :mod:`study.distill`, :mod:`study.prune`, :mod:`study.quant`, :mod:`study.search`,
  :mod:`study.bench`    - the study sections
- :mod:`study.report`   - executes notebooks (papermill) and builds the HTML report
"""

__version__ = "0.1.0"

NUM_CLASSES = 14
IGNORE_INDEX = 255
CLASS_NAMES = (
    "background", "avalanche", "building_undamaged", "building_damaged",
    "cracks", "debris_flow", "fire", "flood", "ice_jam_flow", "lava_flow",
    "person", "pyroclastic_flow", "road", "vehicle",
)
#: Classes source 000 calls out as rare and small (their IoU is tracked separately).
RARE_CLASSES = ("person", "vehicle", "cracks")

SECTIONS = (
    "baselines", "distillation", "structured_pruning", "head_pruning",
    "iterative_pruning", "quantization", "bilevel_search", "deployment",
)
#: Notebook file stem -> the table sections it writes.
NOTEBOOKS = {
    "00_baselines": ("baselines",),
    "01_distillation": ("distillation",),
    "02_structured_pruning": ("structured_pruning",),
    "03_head_pruning": ("head_pruning",),
    "04_iterative_pruning": ("iterative_pruning",),
    "05_quantization": ("quantization",),
    "06_bilevel_search": ("bilevel_search",),
    "07_deployment": ("deployment",),
}
#: Columns every section table starts with (issue #2).
BASE_COLUMNS = ("section", "model", "method", "input_hw", "params_m", "gmacs", "miou", "mdice")
