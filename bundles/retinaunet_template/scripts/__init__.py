"""A bundle's own code, importable as ``scripts`` under ``monai.bundle run`` (and loaded so by ``workflow.bundle_code``)."""
