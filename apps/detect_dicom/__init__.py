"""The MONAI Deploy detection app: a DICOM study in, TID 1500 SR + SEG + JSON per selected series out."""
