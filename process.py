"""Grand-challenge entry point (HECKTOR 2025 Task 1).

Reads /input/images/{ct,pet}/*, writes /output/images/tumor-lymph-node-segmentation/output.mha (uint8, labels
0/1/2, exactly the CT grid) and nothing else under /output. Run locally with the same paths and limits:
    python process.py --input CASE/input --output OUT --weights weights/demo --report OUT.report.json
"""

import sys

from hnseg_infer.cli.console import import_onnxruntime_quietly

import_onnxruntime_quietly()  # before hnseg_infer.cli.main imports it: one line on stderr, whatever HOME is
from hnseg_infer.cli.main import container_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(container_main(from_process_start=True))
