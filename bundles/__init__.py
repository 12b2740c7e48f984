"""MONAI bundle templates that the planner fills for each task (``retinaunet_template/``)."""
