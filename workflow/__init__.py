"""The workflow: the ``nndet_*`` commands and the stages that drive generated bundles across folds."""
