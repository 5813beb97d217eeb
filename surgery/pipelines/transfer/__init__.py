"""`surgery transfer`: port an SLM's adapter to an LLM without the LLM's gradients (W_plug + depth map).

  run.py      the command: open the pair, fit, let the adapter's kind port itself, write OUT
  plan.py     which spaces a module reads and writes, and where their activations are captured
  fit.py      one ridge map per (LLM layer, space, direction) from paired moments (Pair, FitOptions → Fits)
  capture.py  calibration batches (tokens paired by character offsets) and forward hooks → moments
  stream.py   the models run one window of layers at a time, weights read per window in their dtype
  memory.py   the --max-memory budget: windows, the peak-memory formula, one-line out-of-memory errors
  maps.py     fitted maps spilled to disk per window; projections.safetensors
"""

from .run import DEPTHS, FORMAT, MAPS, PROJECTIONS, TransferConfig, transfer

__all__ = ["DEPTHS", "FORMAT", "MAPS", "PROJECTIONS", "TransferConfig", "transfer"]
