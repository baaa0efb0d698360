"""The compare workload and its measurements: a small Llama (:mod:`.workload`), corpora and tokenizers
(:mod:`.corpus`), the comparison itself (:mod:`.compare`) and its outputs (:mod:`.report`).

Importing this package is cheap; transformers and matplotlib are imported only when a model is built or a plot
drawn (``pip install 'lmopt[compare]'``).
"""

from .compare import CompareConfig, run_compare
from .report import write_outputs

__all__ = ["CompareConfig", "run_compare", "write_outputs"]
