"""``python -m apps.dicom_node [run|status|check] --config node.yaml``."""

import sys

from apps.dicom_node.node import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m apps.dicom_node"))
