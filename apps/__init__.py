"""MONAI Deploy applications: DICOM in, findings out (SR, SEG, JSON); the DICOM node for a PACS."""
