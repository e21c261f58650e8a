"""The runtimes the benchmark can time, and the export format each one runs (a table: no heavy import)."""
from __future__ import annotations

RUNTIMES = ("torch", "onnxruntime", "executorch-xnnpack", "executorch-portable", "coreml")
FORMAT_OF = {"onnxruntime": "onnx", "executorch-xnnpack": "executorch", "executorch-portable": "executorch",
             "coreml": "coreml"}
RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "executorch": "executorch-xnnpack", "coreml": "coreml"}
ALIASES = {"onnx": "onnxruntime", "executorch": "executorch-xnnpack", "xnnpack": "executorch-xnnpack",
           "portable": "executorch-portable", "pytorch": "torch"}
# the runtimes peer models are exported for and timed on
PEER_RUNTIMES = ("onnxruntime", "executorch-xnnpack")
