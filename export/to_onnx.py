"""Export a trained model to an hnseg weights folder (ONNX files + recipe.json), proving it equal to the original.

    python export/to_onnx.py nnunet RESULTS_DIR --out WEIGHTS_DIR [--folds 0 1 2 3 4] [--checkpoint NAME] [--fp16]
    python export/to_onnx.py monai CHECKPOINT --out WEIGHTS_DIR [...]
    python export/to_onnx.py torch --module pkg.mod:Class --kwargs JSON --state-dict FILE --out WEIGHTS_DIR [...]

`python export/to_onnx.py ROUTE --help` lists each route's options. Exit 0 only when every exported file passed
its proof (PyTorch vs onnxruntime); on any error exit 2 with one line naming the cause, and nothing written.
"""

import argparse
import importlib
import sys
from pathlib import Path

from hnseg_infer.errors import HnsegError

# route → module with add_arguments(parser) and export(args) -> Path of the weights folder
ROUTES = {"nnunet": "hnseg_export.from_nnunet", "monai": "hnseg_export.from_monai",
          "torch": "hnseg_export.from_torch"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    routes = parser.add_subparsers(dest="route", required=True)
    modules = {}
    for route, module_name in ROUTES.items():
        modules[route] = importlib.import_module(module_name)
        sub = routes.add_parser(route, help=modules[route].__doc__.splitlines()[0])
        modules[route].add_arguments(sub)
        sub.add_argument("--out", type=Path, required=True, help="the weights folder to write")
        sub.add_argument("--fp16", action="store_true",
                         help="store fp16 weights (normalisation in fp32); agreement with fp32 is measured")
        sub.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args(argv)
    try:
        out = modules[args.route].export(args)
    except HnsegError as error:
        print(f"to_onnx: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (recipe.json and the proven ONNX files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
