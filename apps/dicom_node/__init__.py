"""The DICOM node: a Storage SCP beside the PACS that runs the detection app on received series and sends
the SR and SEG back (``nndet_dicom_node --config node.yaml``)."""
