"""segcompress study package: compressing ViT-style semantic segmenters for edge devices.

Two layers (see README.md, "The study package").

Methods - work on models, tensors, loaders and files; no notebook context:

- :mod:`study.data`     - embedded UAV disaster dataset generator, LPCVC loader, batch stream
- :mod:`study.models`   - registry of segmentation models, pretrained encoders, MACs, fingerprint
- :mod:`study.train`    - training loop, evaluation, progress, seeding
- :mod:`study.metrics`  - mIoU, mDice (LPCVC score), bootstrap / seed intervals, verdicts
- :mod:`study.distill`  - KD losses (KL, MSE, FitNets features, CWD) and the KD training loss
- :mod:`study.prune`    - structured / unstructured / head / MLP pruning, iterative schedules
- :mod:`study.quant`    - ONNX export, fp16, INT8 PTQ, op profiles, selective quantization
- :mod:`study.bilevel`  - source 002's bi-level pruning-parameterization search
- :mod:`study.bench`    - latency / memory measurement (local and on devices over SSH)
- :mod:`study.device_runner` - the self-contained file copied to a device

The lab bench - the only code that takes a :class:`~study.context.Context`:

- :mod:`study.sections` - one module per notebook (cached runs, sweep plans, rows, verdicts)
- :mod:`study.context`  - what a notebook gets: profile, seed, cache, data, table/figure writers
- :mod:`study.report`   - executes notebooks (papermill), builds and checks the HTML report
- :mod:`study.profiles`, :mod:`study.cache` - experiment sizes; atomic, code-keyed cache
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
    "iterative_pruning", "quantization", "bilevel_search", "deployment", "pipeline",
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
    "08_pipeline": ("pipeline",),
}
#: Columns every section table starts with (issue #2).
BASE_COLUMNS = ("section", "model", "method", "input_hw", "params_m", "gmacs", "miou", "mdice")
