"""``python -m apps.detect_dicom -i DICOM_DIR -o OUT_DIR -m CONSOLIDATED_BUNDLE`` (how a MAP starts the app)."""

import sys

from apps.detect_dicom.app import main

if __name__ == "__main__":
    sys.exit(main())
